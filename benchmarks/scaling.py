"""Throughput on N GPUs vs 1 through ``[compute] backend = "ray"``: edits, captions, training steps (issues 13, 17).

Each measurement runs the real stage (``flywheel.enrich`` / ``flywheel.caption``) in this process, the
catalog's single writer, with its model replicated on Ray actors (one per GPU), first on 1 replica and then
on N, in the same run and on the same machine, so the ratio is the speed-up a user gets, the driver's
catalog writes and the store included. ``--stack`` (default: the project's default stack,
``flywheel.models.stacks.DEFAULT_STACK``, read at run time) picks the models; only the hub repos that the
chosen workloads need are built (``benchmarks/fullsize.py``: full size, random weights), into ``--cache``,
and repos already there are reused (e.g. the cache ``benchmarks/loop.py`` built):

- edits: the stack's editor (its fast preset: klein4b's distilled FLUX.2 klein 4B, 4 steps, compiled;
  flux1's Qwen-Image-Edit-2511 + Lightning), 5 sources x ``--recipes`` recipes, [enrich] batch_size 1 (the
  default): one unit per edit. The first recipe's 5 edits run untimed first (each replica's first edit
  compiles its blocks); the rest are timed;
- captions: the stack's captioner (klein4b: Qwen3-VL-4B) at the default batch (16), ``--caption-images``
  random 1024x1024 images;
- training steps: the stack's LoRA base (klein4b: FLUX.2 klein-base 4B) at 1024², through
  ``flywheel.train`` with ``[train] gpus`` 1 and N (what ``flywheel train --gpus N`` runs), timed by
  ``benchmarks/train_gpus.py``'s own ``measure`` (median s/step after ``--warmup`` steps; images/s).

Model loads are timed apart from the stage: throughput is units per second with the replicas loaded.
Prints the GPU, then per workload the 1-replica baseline, the N-replica figure and the ratio (goal of issue
17: 1.8x or better on 2 GPUs). Below the goal it prints where the driver's time went in the N-replica run
(``scaling_profile.py``): preparing units (reading images, 'running' rows), sending them, waiting on the actors,
recording results (catalog rows, PNG encoding into the store), and how busy the replicas were.

    # CPU dry run (the klein4b stack's tiny architectures, 1 CPU per replica; about 2 minutes on 2 cores):
    PYTHONPATH=src .venv/bin/python benchmarks/scaling.py --tiny --stack klein4b --device cpu --gpus 2 \\
        --recipes 2 --caption-images 32 --train-steps 4 --warmup 1 --root /tmp/scaling-dry
    # nvidia-h200-x2 (carry .whl: Ray, benchmarks/ray_wheels.py), reusing the hub cache benchmarks/loop.py built;
    # two calls (10-minute limit each), both completing /tmp/scaling/results.json:
    ([ -d /tmp/raypkgs/ray ] || python -m pip install -q --no-deps --no-index --target /tmp/raypkgs .whl/ray-*.whl \\
        .whl/jsonschema*.whl .whl/referencing-*.whl .whl/rpds_py-*.whl) && PYTHONPATH=src:/tmp/raypkgs python \\
        benchmarks/scaling.py --stack klein4b --gpus 2 --cache /tmp/bench24/hub --root /tmp/scaling --what edits captions
    PYTHONPATH=src:/tmp/raypkgs python benchmarks/scaling.py --stack klein4b --gpus 2 --cache /tmp/bench24/hub \\
        --root /tmp/scaling --what training
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize
import train_gpus
from scaling_profile import breakdown, profile

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["forest", "sunset", "oil_painting", "left_view", "city_night", "beach", "neon", "anime"]
TINY = {"flux1": "tiny", "flux1-kontext": "tiny", "klein4b": "tiny-klein"}  # a stack's tiny architectures
GOAL = 1.8


builders = fullsize.preset_builders  # preset -> (hub repo it needs in the cache, its builder)


def ensure(preset: str, cache: Path, args) -> None:
    """Build ``preset``'s random-weight repo into ``cache`` unless it is there (tiny presets build themselves)."""
    if args.tiny:
        return
    repo, build = builders()[preset]
    if fullsize.has_repo(cache, repo):
        print(f"reusing {repo} from {cache}", flush=True)
        return
    print(f"building {repo} (random weights) into {cache}", flush=True)
    build(cache, tiny=False, device=args.build_device)


def config(args, replicas: int) -> str:
    gpu = args.device != "cpu"
    device = f'device = "{args.device}"\n' if args.device != "auto" else ""
    tiny_enrich = "max_area = 4096\nreferences = 1\n" if args.tiny else ""
    return f"""[project]
name = "Scaling"
trigger = "fw_scale"
[ingest]
detect_faces = false
[models]
stack = "{args.stack}"
{device}
[enrich]
recipes = {json.dumps(RECIPES[:args.recipes])}
{tiny_enrich}
[caption]
{'max_new_tokens = 8' if args.tiny else ''}
[compute]
backend = "ray"
actors = {replicas}
gpus_per_actor = {1 if gpu else 0}
cpus_per_actor = 1
"""


def base_project(root: Path, args) -> Path:
    """5 ingested sample sources (and the caption workload's random images), copied for each measurement."""
    import numpy as np
    from PIL import Image

    from flywheel.images import phash, phash_hex, pixel_sha256
    from flywheel.ingest import ingest
    from flywheel.project import open_project
    from flywheel.sample import write_sample

    folder = root / "base"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "flywheel.toml").write_text(config(args, 1), encoding="utf-8")
    with open_project(folder) as p:
        ingest(p, [str(x) for x in write_sample(folder / "sources")])
        rng, side = np.random.default_rng(0), 64 if args.tiny else 1024
        for _ in range(args.caption_images):  # stand-ins for edits: what captioning costs does not depend on them
            image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
            sha, _ = p.store.put_image(image)
            p.catalog.insert("images", {"sha256": sha, "pixel_sha256": pixel_sha256(image), "kind": "enriched",
                                        "phash": phash_hex(phash(image)), "width": side, "height": side, "round": 0})
    return folder


def measure(base: Path, root: Path, args, what: str, replicas: int) -> dict:
    """Load ``replicas`` replicas, then time the stage: units per second with the models loaded."""
    from flywheel.caption import caption
    from flywheel.enrich import enrich, load_enrich_editor
    from flywheel.models.pool import ModelPool
    from flywheel.project import open_project

    folder = root / f"{what}-{replicas}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    (folder / "flywheel.toml").write_text(config(args, replicas), encoding="utf-8")
    with open_project(folder) as p, ModelPool(p.config.models, catalog=p.catalog, compute=p.config.compute,
                                              stage=what) as pool:
        t0 = time.perf_counter()
        if what == "edits":
            load_enrich_editor(p.config.enrich, p.config.models, pool, base=p.root)
        else:
            pool.vlm(p.config.models.captioner)
        load_s = time.perf_counter() - t0
        warm_s = 0.0
        if what == "edits":  # the first recipe, untimed: each replica's first edit compiles ([enrich] speed "auto")
            t0 = time.perf_counter()
            enrich(p, p.config.enrich.model_copy(update={"recipes": p.config.enrich.recipes[:1]}), pool=pool)
            warm_s = time.perf_counter() - t0
        with profile(defaultdict(float)) as totals:
            t0 = time.perf_counter()
            units = len(enrich(p, pool=pool).made) if what == "edits" else len(caption(p, pool=pool).written)
            seconds = time.perf_counter() - t0
    return {"replicas": replicas, "units": units, "load_s": load_s, "warmup_s": warm_s, "stage_s": seconds,
            "per_s": units / seconds, "profile": dict(totals)}


def training(args, cache: Path) -> dict:
    """The stack's LoRA base trained with [train] gpus 1 and N through ``flywheel.train`` (the path of
    ``flywheel train --gpus N``), measured by ``benchmarks/train_gpus.py`` (its project and timing, reused)."""
    from flywheel.models.stacks import STACKS

    base = STACKS[args.stack].base
    ensure(base, cache, args)
    res = 64 if args.tiny else 1024
    opts = argparse.Namespace(res=res, steps=args.train_steps, batch=1, warmup=args.warmup,
                              device="cpu" if args.device == "cpu" else "cuda",
                              train=["max_sequence_length=32"] if args.tiny else [], profile=None)
    rows = {}
    for k in (1, args.gpus):
        shutil.rmtree(args.root / f"train-{k}", ignore_errors=True)  # a new project each run, like measure()'s
        project = train_gpus.make_project(args.root / f"train-{k}", 8, res)
        try:
            rows[k] = train_gpus.measure(project, base, k, opts)
        finally:
            project.close()
        r = rows[k]
        print(f"training  {k} GPU(s): {r['s_step']:.3f} s/step (median of {r['timed_steps']}), effective batch "
              f"{r['effective_batch']} = {r['images_s']:.3f} images/s (run {r['wall_s']:.0f} s, loads included)",
              flush=True)
    one, many = rows[1], rows[args.gpus]
    speedup = many["images_s"] / one["images_s"]
    if speedup < GOAL:  # each rank trains the same batch as the 1-GPU run: the extra time per step is the cost
        print(f"training  below {GOAL}x: a step takes {1000 * (many['s_step'] - one['s_step']):+.0f} ms on "
              f"{args.gpus} GPUs vs 1 (same batch per rank: the gradient all-reduce, waiting for the slower rank, "
              f"the data split); {1000 * one['s_step']:.0f} ms is a 1-GPU step", flush=True)
    return {"base": base, "resolution": res, **{str(k): v for k, v in rows.items()}, "speedup": speedup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="N: replicas of the scaled run (GPUs, or CPUs on cpu)")
    parser.add_argument("--what", nargs="+", choices=["edits", "captions", "training", "all"], default=["all"],
                        help="workloads (several: one call each on a GPU machine with a per-call time limit)")
    parser.add_argument("--stack", default=None, help="model stack (default: flywheel's default stack; with "
                        "--tiny its tiny architectures)")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures (a CPU dry run of the same path)")
    parser.add_argument("--device", default="auto", help="[models] device (cpu with --tiny)")
    parser.add_argument("--recipes", type=int, default=5, help="recipes x 5 sources = edits (default 25: the "
                        "first recipe's 5 warm up, 20 are timed)")
    parser.add_argument("--caption-images", type=int, default=128, help="images to caption (8 batches of 16)")
    parser.add_argument("--train-steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="training steps left out of the median")
    parser.add_argument("--root", type=Path, default=ROOT / ".bench" / "scaling", help="projects and results")
    parser.add_argument("--cache", type=Path, default=None, help="the random-weight hub cache, reused and "
                        "completed (default: ROOT/hub)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    for name in ("flywheel.caption", "flywheel.captions"):  # random weights: every caption is flagged unusable
        logging.getLogger(name).setLevel(logging.ERROR)
    from flywheel.models.stacks import DEFAULT_STACK, STACKS

    args.stack = args.stack or DEFAULT_STACK
    if args.tiny and not args.stack.startswith("tiny"):
        args.stack = TINY.get(args.stack, "tiny-klein")
    if args.stack not in STACKS:
        parser.error(f"unknown stack {args.stack!r} (stacks: {', '.join(STACKS)})")
    args.root = args.root.resolve()
    cache = (args.cache or args.root / "hub").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # Before any model code or Ray starts: the replicas and training ranks inherit these and resolve
    # presets from this cache.
    os.environ.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                       "FLYWHEEL_CACHE": str(args.root / "flywheel-cache")})
    import torch

    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    args.build_device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    stack = STACKS[args.stack]
    print(f"== scaling: {gpu}, torch {torch.__version__}; stack {args.stack} (editor {stack.editor}, captioner "
          f"{stack.captioner}, base {stack.base}); N = {args.gpus} vs 1 ==", flush=True)
    out = args.root / "results.json"  # completed by each call, written after each workload (a cut run keeps those)
    results: dict = {**(json.loads(out.read_text()) if out.exists() else {}), "gpu": gpu, "n": args.gpus,
                     "stack": args.stack}
    todo = [w for w in ("edits", "captions", "training") if w in args.what or "all" in args.what]
    base, ray = None, None
    for what in [w for w in todo if w != "training"]:
        import ray  # only the replicated stages need it: training ranks are torch.distributed processes

        if not ray.is_initialized():
            ray.init(num_cpus=max(args.gpus + 1, 2) if args.device == "cpu" else None, include_dashboard=False,
                     log_to_driver=False)
            res = ray.cluster_resources()
            print(f"ray {ray.__version__}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs", flush=True)
        ensure(stack.editor if what == "edits" else stack.captioner, cache, args)
        base = base or base_project(args.root, args)
        one = measure(base, args.root, args, what, 1)
        many = measure(base, args.root, args, what, args.gpus)
        results[what] = {"1": one, str(args.gpus): many, "speedup": many["per_s"] / one["per_s"]}
        for r in (one, many):
            print(f"{what:9s} {r['replicas']} replica(s): {r['units']} units in {r['stage_s']:.1f} s = "
                  f"{r['per_s']:.3f}/s (load {r['load_s']:.1f} s and warm-up {r['warmup_s']:.1f} s, not counted)",
                  flush=True)
        speedup = results[what]["speedup"]
        print(f"{what:9s} speed-up on {args.gpus} vs 1: {speedup:.2f}x (efficiency {speedup / args.gpus:.0%})",
              flush=True)
        if speedup < GOAL:
            print(f"{what:9s} below {GOAL}x: the driver's time in the {args.gpus}-replica run:\n{breakdown(many)}",
                  flush=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    if "training" in todo:
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # the replicas' GPUs go back before the training ranks start
        results["training"] = training(args, cache)
        print(f"training  speed-up on {args.gpus} vs 1: {results['training']['speedup']:.2f}x", flush=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":  # training ranks are spawned and import this file: nothing may run at import
    main()
