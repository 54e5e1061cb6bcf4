"""`flywheel train` on N GPUs vs the plain one-process path, in one run: seconds per step and images per second.

Builds FLUX.1-dev with random weights (``benchmarks/fullsize.py``, full size; ``--tiny`` for a CPU dry run),
makes a project with ``--images`` captioned images at ``--res``², and trains it through ``flywheel.train.train``
(what ``flywheel train`` calls) once per ``--gpus`` value: 0 is the plain path (this process), N >= 1 the
distributed path (N worker processes, one per GPU, NCCL; gloo with ``--device cpu``). Step times are the gaps
between the run's progress reports (the parent receives rank 0's), the first ``--warmup`` steps dropped (model
compile, allocator warm-up); the median is reported. Loading and caching are not timed. Rows:

- ``overhead``: s/step of ``--gpus 1`` vs the plain path (0), same batch: the distributed path's cost on one
  GPU (goal <= 5 %);
- ``scaling``: images/s of each row vs ``--gpus 1`` (N GPUs, ``batch_size`` per GPU: goal >= 1.8x at N = 2).

    PYTHONPATH=src python benchmarks/train_gpus.py --build-only   # FLUX.1-dev, random weights (once per machine)
    PYTHONPATH=src python benchmarks/train_gpus.py --gpus 0 1     # one GPU: the distributed path's overhead
    PYTHONPATH=src python benchmarks/train_gpus.py --gpus 1 2     # nvidia-h200-x2: 2 GPUs vs 1
    python benchmarks/train_gpus.py --tiny --device cpu --gpus 0 1 2 --res 64 --steps 5 --warmup 1 \
        --train compile=false --work /tmp/train-gpus-tiny                                  # CPU dry run
    PYTHONPATH=src python benchmarks/train_gpus.py --gpus 0 1 0 1 --steps 24 --warmup 4 --profile /tmp/prof

``--profile DIR`` profiles 3 steps after the warm-up in the process that trains (rank 0, and each other rank):
DIR/<gpus>.txt holds the top ops by self CPU time and by CUDA time, and the Python functions by own time
(``flywheel.training.step_profile``); those steps are left out of the timing. Repeating values (``0 1 0 1``)
interleaves the paths; each row is compared with the nearest baseline row before it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize

from flywheel.training import step_profile

log = logging.getLogger("benchmarks.train_gpus")
PROFILED_STEPS = 3


def make_project(root: Path, images: int, res: int):
    """A project holding ``images`` captioned random-pattern images of res x res (one bucket)."""
    import numpy as np
    from PIL import Image

    from flywheel.project import init_project, open_project

    init_project(root, name="Bench", trigger="fw_bench")
    project = open_project(root)
    rng = np.random.default_rng(0)
    for i in range(images):
        y, x = np.mgrid[0:res, 0:res]
        f = rng.uniform(0.01, 0.05, 3)
        arr = np.stack([127 + 120 * np.sin(f[c] * (x + 2 * y) + c) for c in range(3)], -1).astype(np.uint8)
        image = Image.fromarray(arr)
        sha, _ = project.store.put_image(image)
        with project.catalog.transaction():
            image_id = project.catalog.insert("images", {
                "sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": res, "height": res,
                "kind": "source", "round": 0})
            project.catalog.insert("captions", {"image_id": image_id, "text": f"fw_bench, pattern {i}",
                                                "source": "template"})
    return project


def measure(project, base: Path, gpus: int, args, profile: Path | None = None) -> dict:
    """Train ``args.steps`` steps with ``gpus`` (0 = plain path); the median step time after the warm-up.
    ``profile``: a folder for the profile of 3 steps after the warm-up (left out of the timing)."""
    from flywheel.train import train

    overrides = {"base_model": str(base), "resolution": args.res, "steps": args.steps, "batch_size": args.batch,
                 "gpus": gpus, "checkpoint_every": 10_000, "sample_every": 0, "sample_prompts": [],
                 **dict(_parse(kv) for kv in args.train)}
    cfg = project.config.train.model_copy(update=overrides)
    cfg = type(cfg).model_validate(cfg.model_dump())  # the overrides validated like flywheel.toml
    stamps: list[float] = []
    if profile:  # read by the process that trains (this one, or the ranks: spawned workers inherit it)
        os.environ[step_profile.ENV] = step_profile.request(profile.resolve() / f"{gpus}.txt",
                                                            start=args.warmup, steps=PROFILED_STEPS)
    t0 = time.perf_counter()
    try:
        result = train(project, cfg, device=args.device, progress=lambda done, total, label="": stamps.append(
            time.perf_counter()), force=True)
    finally:
        os.environ.pop(step_profile.ENV, None)
    wall = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)][max(0, args.warmup - 1):]
    if profile:  # the profiled steps (and the profiler's start and stop) are not timed
        steps = steps[PROFILED_STEPS + 1:]
    s_step = statistics.median(steps) if steps else float("nan")
    batch = json.loads((result.run_dir / "config.json").read_text())["batch"]
    return {"gpus": gpus, "path": batch["path"], "effective_batch": batch["effective_batch"], "s_step": s_step,
            "images_s": batch["effective_batch"] / s_step, "timed_steps": len(steps), "wall_s": wall,
            "final_loss": result.losses[-1]}


def _nearest(rows: list[dict], i: int, gpus: int) -> dict | None:
    before = [r for r in rows[:i + 1] if r["gpus"] == gpus]
    return before[-1] if before else next((r for r in rows if r["gpus"] == gpus), None)


def _parse(kv: str):
    key, _, value = kv.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        return f"{torch.cuda.get_device_name(0)} x{n} visible, torch {torch.__version__}"
    return f"CPU (no GPU), torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny FLUX (CPU dry run of the same path)")
    ap.add_argument("--device", default="cuda", help="'cuda' (NCCL ranks) or 'cpu' (gloo ranks, with --tiny)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[0, 1], help="0 = plain path; N = N processes")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="[train] batch_size (per GPU on the distributed path)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="another [train] setting, e.g. compile=false (JSON values)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / ".bench" / "train_gpus",
                    help="folder for the model and projects (default: .bench/train_gpus, git-ignored); a second run "
                    "reuses the model built there")
    ap.add_argument("--build-only", action="store_true", help="build the random-weight model in --work and stop")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help=f"profile {PROFILED_STEPS} steps after the warm-up of each --gpus value: top ops "
                    "by self CPU and CUDA time and Python functions by own time, in DIR/<gpus>.txt (rank 0; "
                    "DIR/<gpus>-rank<r>.txt for the others); those steps "
                    f"are left out of the timing, so give --steps at least --warmup + {PROFILED_STEPS + 2} more")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work.resolve()
    cache = work / "hf"
    if not fullsize.has_repo(cache, fullsize.FLUX_DEV):
        fullsize.build_flux_dev(cache, tiny=args.tiny, device="cuda" if args.device != "cpu" else "cpu")
    base = fullsize.snapshot_dir(cache, fullsize.FLUX_DEV)
    if args.build_only:
        return
    rows = []
    for n in args.gpus:
        project = make_project(work / f"proj-gpus{n}-{int(time.time())}", args.images, args.res)
        try:
            first = all(r["gpus"] != n for r in rows)  # the first run of each value is profiled
            rows.append(measure(project, base, n, args, profile=args.profile if first else None))
        finally:
            project.close()
        log.info("gpus=%d: %s", n, rows[-1])
    print(f"\n{gpu_name(args.device)}; FLUX.1-dev {'tiny' if args.tiny else 'full size'}, random weights, "
          f"{args.res}², batch_size {args.batch} per process, {args.steps} steps ({args.warmup} warm-up), "
          f"[train] overrides: {args.train or 'none'}")
    print("| gpus | path | effective batch | s/step | images/s | overhead vs plain | throughput vs 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        # Against the nearest row of the baseline (the one just before, else the first): `--gpus 0 1 0 1`
        # interleaves the paths, so that a machine that slows down or speeds up meanwhile shows as such.
        plain, one = (_nearest(rows, i, n) for n in (0, 1))
        over = f"{r['s_step'] / plain['s_step'] - 1:+.1%}" if plain and r["gpus"] == 1 else "–"  # same batch
        scale = f"{r['images_s'] / one['images_s']:.2f}x" if one and r["gpus"] >= 1 else "–"
        print(f"| {r['gpus']} | {r['path']} | {r['effective_batch']} | {r['s_step']:.3f} | {r['images_s']:.2f} | "
              f"{over} | {scale} |")


if __name__ == "__main__":  # the ranks are spawned: they import this file, so nothing may run at import
    main()
