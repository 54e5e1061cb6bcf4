"""Throughput on N GPUs vs 1 through ``[compute] backend = "ray"``: edits, captions, training steps (issues 13, 17).

Each measurement runs the real stage (``flywheel.enrich`` / ``flywheel.caption``) in this process, the
catalog's single writer, with its model replicated on Ray actors (one per GPU), first on 1 replica and then
on N, in the same run and on the same machine, so the ratio is the speed-up a user gets, the driver's
catalog writes and the store included. Models have random weights at full size (``benchmarks/fullsize.py``
builds the default presets' hub repos into a Hugging Face cache, as ``benchmarks/loop.py`` does):

- edits: the default editor's fast preset (Qwen-Image-Edit-2511 + 4-step Lightning LoRA), 5 sources x
  ``--recipes`` recipes, [enrich] batch_size 1 (the default): one unit per edit;
- captions: Qwen2-VL-2B at the default batch (16), ``--caption-images`` random 1024x1024 images;
- training steps: a HOOK (``training()``), for ``flywheel train --gpus N`` (issue 13 item 2, built
  separately); until that option exists it prints that it was not measured.

Model loads are timed apart from the stage: throughput is units per second of the stage with the
replicas loaded. Prints the GPU, then per workload the 1-replica baseline, the N-replica figure and the
ratio (goal of issue 17: 1.8x or better on 2 GPUs).

    PYTHONPATH=src python benchmarks/scaling.py --gpus 2                  # GPU: edits and captions, 1 GPU then 2
    PYTHONPATH=src python benchmarks/scaling.py --gpus 2 --what captions  # one workload
    python benchmarks/scaling.py --tiny --device cpu --gpus 2             # CPU dry run: tiny models, 1 CPU each

The GPU machine has no package index: ``benchmarks/ray_wheels.py`` writes Ray's wheel (stripped to travel)
and the few packages its image lacks into ``.whl/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["forest", "sunset", "oil_painting", "left_view", "city_night", "beach", "neon", "anime"]


def config(args, replicas: int) -> str:
    gpu = args.device != "cpu"
    models = ('editor = "tiny-qwen-image-edit"\ncaptioner = "tiny"\n' if args.tiny else "")
    device = f'device = "{args.device}"\n' if args.device != "auto" else ""
    tiny_enrich = "max_area = 4096\nreferences = 1\n" if args.tiny else ""
    return f"""[project]
name = "Scaling"
trigger = "fw_scale"
[ingest]
detect_faces = false
[models]
{models}{device}
[enrich]
backend = "qwen-image-edit"
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
        t0 = time.perf_counter()
        if what == "edits":
            units = len(enrich(p, pool=pool).made)
        else:
            units = len(caption(p, pool=pool).written)
        seconds = time.perf_counter() - t0
    return {"replicas": replicas, "units": units, "load_s": round(load_s, 1), "stage_s": round(seconds, 2),
            "per_s": units / seconds}


def training(args, gpus: int) -> dict | None:
    """HOOK: training steps on ``gpus`` GPUs vs 1, once ``flywheel train --gpus N`` exists (issue 13 item 2,
    built separately; this file does not touch training). Runs ``flywheel train --gpus k`` for k = 1 and
    ``gpus`` on the sources (``--force``) at ``--train-steps`` steps, 1024² (64² with --tiny), and reads the
    run's own step timing (``config.json`` "timing": every step, the first, compiling ones included) as images/s;
    ``benchmarks/train_gpus.py`` measures the steady state (warm-up left out) with the plain path beside it."""
    cmd = [sys.executable, "-m", "flywheel"]
    if "--gpus" not in subprocess.run([*cmd, "train", "--help"], capture_output=True, text=True).stdout:
        print("training steps: NOT MEASURED: `flywheel train --gpus N` does not exist yet "
              "(hook: training() in benchmarks/scaling.py)")
        return None
    out = {}
    root = args.root / "train"
    cache = Path(os.environ["HF_HUB_CACHE"])
    if not args.tiny and not fullsize.has_repo(cache, fullsize.FLUX_DEV):  # the default [train] base, at full size
        fullsize.build_flux_dev(cache, tiny=False, device="cuda")
    for k in (1, gpus):
        base = base_project(root, argparse.Namespace(**{**vars(args), "caption_images": 0}))
        size, tiny_base = (64, 'base_model = "tiny"\n') if args.tiny else (1024, "")
        with open(base / "flywheel.toml", "a", encoding="utf-8") as f:
            f.write(f"[train]\nsteps = {args.train_steps}\nresolution = {size}\ncheckpoint_every = 100000\n"
                    f"sample_every = 0\n{tiny_base}")
        on_cpu = ["--device", "cpu"] if args.device == "cpu" else []  # CPU ranks (gloo) only when asked by name
        subprocess.run([*cmd, "-C", str(base), "train", "--gpus", str(k), "--force", *on_cpu], check=True)
        from flywheel.project import open_project

        with open_project(base) as p:
            run = p.catalog.query("SELECT output_dir FROM lora_runs WHERE status = 'ok' ORDER BY id DESC LIMIT 1")[0]
            resolved = json.loads((p.workspace / run["output_dir"] / "config.json").read_text())
        timing, images = resolved["timing"], resolved["timing"]["steps"] * resolved["batch"]["effective_batch"]
        # images, not steps: each of k GPUs trains batch_size images per step (benchmarks/train_gpus.py also
        # leaves the warm-up steps out of its per-step times)
        out[k] = {"replicas": k, "units": images, "stage_s": timing["seconds"], "per_s": images / timing["seconds"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="N: replicas of the scaled run (GPUs, or CPUs on cpu)")
    parser.add_argument("--what", choices=["edits", "captions", "training", "all"], default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures (a CPU dry run of the same path)")
    parser.add_argument("--device", default="auto", help="[models] device (cpu with --tiny)")
    parser.add_argument("--recipes", type=int, default=4, help="recipes x 5 sources = edits (default 20)")
    parser.add_argument("--caption-images", type=int, default=128, help="images to caption (8 batches of 16)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--root", type=Path, default=ROOT / ".bench" / "scaling", help="projects and results")
    parser.add_argument("--cache", type=Path, default=None, help="the random-weight hub cache (default: ROOT/hub)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.root = args.root.resolve()
    cache = (args.cache or args.root / "hub").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # Before any model code or Ray starts: the replicas inherit these and resolve presets from this cache.
    os.environ.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                       "FLYWHEEL_CACHE": str(args.root / "flywheel-cache")})
    import ray
    import torch

    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    build_device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"== scaling: {gpu}; N = {args.gpus} replicas vs 1 ==", flush=True)
    ray.init(num_cpus=max(args.gpus + 1, 2) if args.device == "cpu" else None, include_dashboard=False,
             log_to_driver=False)
    print(f"ray cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
    results: dict = {"gpu": gpu, "n": args.gpus}
    todo = ["edits", "captions", "training"] if args.what == "all" else [args.what]
    needs = {"edits": [(fullsize.QWEN_EDIT, fullsize.build_qwen_image_edit)],
             "captions": [(fullsize.QWEN2_VL_2B, fullsize.build_qwen2_vl)]}
    base = None
    for what in todo:
        if what == "training":
            runs = training(args, args.gpus)
            if runs:
                results["training"] = {**{str(k): v for k, v in runs.items()},
                                       "speedup": runs[args.gpus]["per_s"] / runs[1]["per_s"]}
                for r in runs.values():
                    print(f"training  {r['replicas']} GPU(s): {r['units']} images in {r['stage_s']:.1f} s = "
                          f"{r['per_s']:.3f} images/s", flush=True)
                print(f"training  speed-up on {args.gpus} vs 1: {results['training']['speedup']:.2f}x", flush=True)
            continue
        for repo, build in needs[what] if not args.tiny else []:
            if not fullsize.has_repo(cache, repo):
                build(cache, tiny=False, device=build_device)
        base = base or base_project(args.root, args)
        one = measure(base, args.root, args, what, 1)
        many = measure(base, args.root, args, what, args.gpus)
        results[what] = {"1": one, str(args.gpus): many, "speedup": many["per_s"] / one["per_s"]}
        for r in (one, many):
            print(f"{what:9s} {r['replicas']} replica(s): {r['units']} units in {r['stage_s']:.1f} s = "
                  f"{r['per_s']:.3f}/s (load {r['load_s']:.1f} s)", flush=True)
        print(f"{what:9s} speed-up on {args.gpus} vs 1: {results[what]['speedup']:.2f}x "
              f"(efficiency {results[what]['speedup'] / args.gpus:.0%})", flush=True)
    (args.root / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
