"""Caption stages as ``flywheel caption`` runs them with the default settings, at several stage sizes.

``[models] vlm_compile = "auto"`` (the default) compiles the decode step only for a stage of
``vlm_speed.COMPILE_PAYS_OFF`` images or more: compiling costs tens of seconds once per process, the compiled
step then saves a fraction of a second per image. This measures both sides of that choice on the real path:

1. the captioner at full size with random weights, in the real repo layout (``fullsize.py``), loaded by
   ``flywheel.models.load_vlm`` with the default ``[models]`` settings (only ``device`` given);
2. stages of N images (PNG files opened per request, as the stage opens them from the store) in the caption
   stage's default batches, each announced with ``expect(N)`` as the stage does, smallest first: the process
   compiles at the first stage at or over the threshold, as a ``flywheel run`` would;
3. the compilation once more after ``torch._dynamo.reset()`` (inductor's on-disk cache is warm then, as for a
   second ``flywheel caption`` on the same machine);
4. from the measured per-image times and the compilation, the stage size where compiling starts to pay
   (the break-even), against the threshold the default uses.

Answers have a fixed length (min = max new tokens) so that random weights cannot stop early.

    PYTHONPATH=src python benchmarks/vlm_stage.py --cache /tmp/hub --sizes 32,64,128,256
    PYTHONPATH=src python benchmarks/vlm_stage.py --tiny --device cpu --cache /tmp/hub   # CI: the code path
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fullsize  # noqa: E402

BUILDERS = {"qwen2-vl-2b": (fullsize.build_qwen2_vl, fullsize.QWEN2_VL_2B),
            "qwen3-vl-4b": (fullsize.build_qwen3_vl_4b, fullsize.QWEN3_VL_4B)}
PROMPT = "Describe this image in one detailed paragraph."


def stage(vlm, paths: list[Path], n: int, batch: int, new_tokens: int, sync) -> dict:
    """One caption stage of ``n`` images as caption.py runs it: expect(n), then batch after batch."""
    from PIL import Image

    from flywheel.models.base import ChatRequest

    vlm.expect(n)
    times = []
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        t = time.perf_counter()
        reqs = [ChatRequest(PROMPT, [Image.open(paths[i % len(paths)])]) for i in range(start, min(n, start + batch))]
        out = vlm.generate(reqs, max_new_tokens=new_tokens)
        assert len(out) == len(reqs)
        sync()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]  # median batch after the first
    return dict(images=n, seconds=total, images_per_s=n / total, first_batch_s=times[0], batch_s=steady,
                compiled=vlm.compiled_decode)


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from flywheel.config import CaptionConfig, ModelsConfig
    from flywheel.models import load_vlm
    from flywheel.models.vlm_speed import COMPILE_PAYS_OFF

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(BUILDERS), default="qwen2-vl-2b")
    ap.add_argument("--cache", type=Path, required=True, help="where the random-weight repo is built (kept)")
    ap.add_argument("--sizes", default="32,64,128,256", help="stage sizes, run smallest first")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="tiny model: checks the code path, measures nothing")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", default=None, help="[models] vlm_compile instead of the default (CPU dry runs: on)")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    build, repo = BUILDERS[args.model]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | {args.model} | threshold {COMPILE_PAYS_OFF}", flush=True)

    # 1. The repo on disk, loaded as `flywheel caption` loads it.
    if not fullsize.has_repo(args.cache, repo):
        build(args.cache, tiny=args.tiny, device=device)
    t0 = time.perf_counter()
    models = ModelsConfig(device=device, **({"vlm_compile": args.compile} if args.compile else {}))
    vlm = load_vlm(str(fullsize.snapshot_dir(args.cache, repo)), models)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; vlm_compile={models.vlm_compile!r}", flush=True)
    if device != "cuda":
        vlm.compile_backend = "eager"  # CI: dynamo's trace without inductor
    vlm.generation = {"min_new_tokens": args.new_tokens}
    batch = min(CaptionConfig().batch_size, models.vlm_batch_size)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    size = 128 if args.tiny else 1024
    folder = Path(tempfile.mkdtemp(prefix="vlm_stage_"))
    paths = []
    for i in range(8):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])

    # 2. Stages with the default settings, smallest first.
    rows = []
    print(f"\n{'stage':>6} {'compiled':>9} {'seconds':>9} {'img/s':>7} {'first batch':>12} {'batch':>7}  (batch {batch})")
    for n in sizes:
        rows.append(stage(vlm, paths, n, batch, args.new_tokens, sync))
        r = rows[-1]
        print(f"{n:>6} {str(r['compiled']):>9} {r['seconds']:>9.1f} {r['images_per_s']:>7.2f} "
              f"{r['first_batch_s']:>12.1f} {r['batch_s']:>7.2f}", flush=True)

    # 3. The compilation again with inductor's cache warm (a second process on the same machine).
    warm = None
    if any(r["compiled"] for r in rows):
        torch._dynamo.reset()
        again = stage(vlm, paths, 2 * batch, batch, args.new_tokens, sync)
        warm = again["first_batch_s"] - again["batch_s"]
        print(f"compiled again after torch._dynamo.reset(): first batch {again['first_batch_s']:.1f} s "
              f"(compiling ~{warm:.1f} s with a warm cache)", flush=True)

    # 4. The break-even from the measured times.
    eager = [r for r in rows if not r["compiled"]]
    fast = [r for r in rows if r["compiled"]]
    if eager and fast:
        per_eager = eager[-1]["batch_s"] / batch
        per_fast = fast[-1]["batch_s"] / batch
        cold = fast[0]["first_batch_s"] - fast[0]["batch_s"]
        saved = per_eager - per_fast
        print(f"\nper image: {per_eager:.3f} s not compiled, {per_fast:.3f} s compiled ({per_eager / per_fast:.2f}x); "
              f"compiling {cold:.1f} s (cold)" + (f", {warm:.1f} s (warm cache)" if warm is not None else ""))
        if saved > 0:
            line = f"break-even: {cold / saved:.0f} images (cold)"
            if warm is not None:
                line += f", {warm / saved:.0f} images (warm cache)"
            print(f"{line}; the default compiles from {COMPILE_PAYS_OFF} images")


if __name__ == "__main__":
    main()
