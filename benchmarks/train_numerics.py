"""Numerics of the training speed options: the loss curve of a Flywheel variant against the bf16 step.

Two LoRA runs from the same random FLUX.1-dev-shaped transformer (random bf16 weights, built on the
device), the same LoRA init, the same few cached batches (random latents and text embeddings) and the same
noise / t generator: the baseline ``bf16+ckpt0+eager`` (bf16 base, bf16 matmuls) and the candidate
(default: ``default``, what ``flywheel train`` runs on this device). Prints the per-step relative loss
difference (max, mean), the same for the loss smoothed over 20 steps, the relative difference of the
trained LoRA weights, and PASS / FAIL against the stated tolerance:

    per-step loss: mean relative difference <= 2 %, max <= 10 %; smoothed (20 steps) curve: max <= 2 %.

    python benchmarks/train_numerics.py                          # GPU, full size, 200 steps at 512²
    python benchmarks/train_numerics.py --double 4 --single 8    # full width, fewer blocks (faster)
    python benchmarks/train_numerics.py --tiny --device cpu --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TOL_MEAN, TOL_MAX, TOL_SMOOTH = 0.02, 0.10, 0.02


def run(spec: str, dims: dict, dev: str, res: int, steps: int, lr: float, n_batches: int):
    """Train one variant; return (per-step losses, trained LoRA weights on the CPU)."""
    import torch
    import train_step as ts

    from flywheel.training import quantize, speed
    from flywheel.training.flux_step import Batch, train_step

    cfg, base = ts.variant_config(spec)
    torch._dynamo.reset()
    tr, params = ts.build(dims, dev, torch.float32)
    if base == "fp8":
        quantize.quantize_base(tr, "fp8", dev)
    done = speed.apply(tr, cfg, dev, base_quantize=base)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **speed.adamw_options(cfg, params))
    g = torch.Generator(dev).manual_seed(1)
    batches = []
    for _ in range(n_batches):
        lat = torch.randn(1, 16, res // 8, res // 8, generator=g, device=dev).to(torch.bfloat16)
        pe = torch.randn(1, 512, dims["joint_attention_dim"], generator=g, device=dev).to(torch.bfloat16)
        pooled = torch.randn(1, dims["pooled_projection_dim"], generator=g, device=dev).to(torch.bfloat16)
        batches.append(Batch(lat, pe, pooled))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    losses = [float(train_step(tr, opt, batches[i % n_batches], gen, params=params)) for i in range(steps)]
    print(f"{spec:28s} [{done.fp8_matmul=} {done.compiled_blocks=} {done.checkpointed_blocks=}] "
          f"{(time.perf_counter() - t0) / steps:.3f} s/step, loss {losses[0]:.4f} -> "
          f"{sum(losses[-20:]) / len(losses[-20:]):.4f} (last 20)", flush=True)
    lora = torch.cat([p.detach().float().flatten().cpu() for p in params])
    del tr, opt, params
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return losses, lora


def smooth(xs: list[float], k: int = 20) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    import torch
    import train_step as ts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batches", type=int, default=4, help="distinct cached batches, cycled")
    ap.add_argument("--double", type=int, help="double-stream blocks (default: FLUX.1-dev's 19)")
    ap.add_argument("--single", type=int, help="single-stream blocks (default: FLUX.1-dev's 38)")
    ap.add_argument("--baseline", default="bf16+ckpt0+eager")
    ap.add_argument("--candidate", nargs="+", default=["default"])
    args = ap.parse_args()
    dims = dict(ts.TINY if args.tiny else ts.FULL)
    if args.double is not None:
        dims["num_layers"] = args.double
    if args.single is not None:
        dims["num_single_layers"] = args.single
    res = 64 if args.tiny else args.res
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as flywheel train
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    print(f"{dims['num_layers']} double + {dims['num_single_layers']} single blocks, {res}², {args.steps} steps, "
          f"lr {args.lr:g}; tolerance: mean <= {TOL_MEAN:.0%}, max <= {TOL_MAX:.0%}, smoothed max <= "
          f"{TOL_SMOOTH:.0%}", flush=True)
    base, base_lora = run(args.baseline, dims, args.device, res, args.steps, args.lr, args.batches)
    for spec in args.candidate:
        try:
            cand, lora = run(spec, dims, args.device, res, args.steps, args.lr, args.batches)
        except Exception as err:  # noqa: BLE001 - report and go on to the next candidate
            print(f"{spec}: FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
            continue
        rel = [abs(c - b) / abs(b) for c, b in zip(cand, base)]
        srel = [abs(c - b) / abs(b) for c, b in zip(smooth(cand), smooth(base))]
        mean, mx, smx = sum(rel) / len(rel), max(rel), max(srel)
        wrel = float((lora - base_lora).norm() / base_lora.norm())
        ok = mean <= TOL_MEAN and mx <= TOL_MAX and smx <= TOL_SMOOTH
        print(f"{spec} vs {args.baseline}: loss rel. diff mean {mean:.2%} max {mx:.2%}, smoothed max {smx:.2%}; "
              f"LoRA weights rel. diff {wrel:.2%} -> {'PASS' if ok else 'FAIL'}", flush=True)


if __name__ == "__main__":
    main()
