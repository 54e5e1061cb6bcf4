"""FLUX.1-dev LoRA training step: Flywheel's step against a plain diffusers + peft reference, in one run.

Full FLUX.1-dev size (11.9 B parameters) with random bf16 weights built on the GPU (speed and memory do
not depend on the values), batch 1, 512 T5 tokens, LoRA rank 16 on to_q/k/v/out.0. Prints the GPU, then
for each variant and resolution the mean step time and the peak GPU memory, and the ratio to the
reference measured in the same run.

- reference: the recipe of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: bf16 base and
  bf16 LoRA under bf16 autocast, gradient checkpointing on every block, uniform t, AdamW, grad clipping.
- flywheel: ``flywheel.training.flux_step.train_step`` (the function ``flywheel train`` runs) on a bf16
  or fp8 frozen base (``flywheel.training.fp8``: fp8 matmuls, or ``--fp8-storage-only``), fp32 or bf16
  LoRA, with block checkpointing on every N-th block (``--ckpt-every``, 0 = none) and optionally
  ``torch.compile`` per block. ``--micro`` first times single FLUX-sized layers, bf16 against fp8.
``--lowvram`` instead times ``flywheel train``'s low-VRAM options against its bf16 base in one run: the
frozen base as bf16, fp8 (flywheel.training.fp8, what quantize_base = "fp8" does), torchao float8
weight-only (for comparison), torchao int8 and bitsandbytes NF4 (``flywheel.training.quantize``, the code
``flywheel train`` runs), and NF4 with bitsandbytes' AdamW8bit; fp32 LoRA, checkpointing on every block.
It first prints each option's error against bf16 on one FLUX-sized layer.
Results and what they mean: docs/training.md.

    python benchmarks/train_step.py                 # GPU, full size
    python benchmarks/train_step.py --lowvram --res 1024 --warmup 2 --steps 5
    python benchmarks/train_step.py --tiny --device cpu --steps 2   # dry run of the code paths
    python benchmarks/train_step.py --tiny --device cpu --steps 2 --lowvram
"""

from __future__ import annotations

import argparse
import gc
import time
from functools import partial

FULL = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
            num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
            axes_dims_rope=(16, 56, 56))
TINY = dict(attention_head_dim=16, guidance_embeds=True, in_channels=64, joint_attention_dim=32, num_attention_heads=2,
            num_layers=2, num_single_layers=2, patch_size=1, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
PROFILE = False


def build(cfg: dict, device: str, lora_dtype):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            tr = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(lora_dtype)
    tr.train()
    return tr, params


def inputs(cfg: dict, res: int, device: str):
    import torch

    from flywheel.training.flux_step import Batch

    g = torch.Generator(device).manual_seed(0)
    lat = torch.randn(1, 16, res // 8, res // 8, generator=g, device=device, dtype=torch.bfloat16)
    pe = torch.randn(1, 512, cfg["joint_attention_dim"], generator=g, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device, dtype=torch.bfloat16)
    return Batch(lat, pe, pooled)


def reference_step(tr, opt, batch, params):
    """diffusers' train_dreambooth_lora_flux.py loop body (weighting 'none' = uniform t, guidance 3.5)."""
    import torch

    from flywheel.training.flux_step import image_ids, pack_latents

    lat = batch.latents
    b, c, h, w = lat.shape
    noise = torch.randn_like(lat)
    t = torch.rand(b, device=lat.device)
    sig = t.view(b, 1, 1, 1).to(lat.dtype)
    noisy = (1 - sig) * lat + sig * noise
    with torch.autocast(lat.device.type, dtype=torch.bfloat16):
        pred = tr(hidden_states=pack_latents(noisy), timestep=t.to(lat.dtype),
                  guidance=torch.full((b,), 3.5, device=lat.device), pooled_projections=batch.pooled,
                  encoder_hidden_states=batch.prompt_embeds,
                  txt_ids=torch.zeros(batch.prompt_embeds.shape[1], 3, device=lat.device),
                  img_ids=image_ids(h, w, lat.device, lat.dtype), return_dict=False)[0]
    loss = torch.mean(((pred.float() - pack_latents(noise - lat).float()) ** 2).reshape(b, -1), 1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def gpu_busy(step) -> float:
    """Seconds of GPU kernel time in one step (torch.profiler): against wall time, shows CPU-boundness."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def measure(step, device: str, steps: int, warmup: int) -> tuple[float, float]:
    import torch

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)  # waits for the GPU
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    if PROFILE and device.startswith("cuda"):
        print(f"    GPU kernel time {gpu_busy(step):.3f} s of {dt:.3f} s wall", flush=True)
    return dt, peak


def micro(dev: str) -> None:
    """fwd+bwd time of one FLUX-sized frozen linear: bf16 against the fp8 recipes, eager and compiled."""
    import torch

    from flywheel.training.fp8 import fp8_frozen_linear_cls

    cls = fp8_frozen_linear_cls()
    for k, n in [(3072, 3072), (3072, 12288), (15360, 3072)]:
        lin = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(4608, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        for name, mod in [("bf16", lin), ("fp8 tensor/fp8-bwd", cls(lin)),
                          ("fp8 row/bf16-bwd", cls(lin, rowwise=True, fp8_backward=False))]:
            for compiled in (False, True):
                f = torch.compile(mod) if compiled else mod

                def step():
                    f(x).backward(torch.ones(4608, n, device=dev, dtype=torch.bfloat16))
                    return x.grad
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / 20 * 1e3
                tf = 2 * 2 * 4608 * k * n / (ms / 1e3) / 1e12
                print(f"  micro {k:5d}->{n:5d} {name:20s}{' compiled' if compiled else '         '} "
                      f"{ms:6.3f} ms fwd+bwd ({tf:4.0f} TFLOP/s)", flush=True)


def free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    from flywheel.training.flux_step import checkpoint_blocks, train_step
    from flywheel.training.fp8 import convert_to_fp8

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ckpt-every", type=int, nargs="+", default=[1, 2, 3], help="flywheel variants to run")
    ap.add_argument("--compile", action="store_true", help="also run the fp8 variants with torch.compile per block")
    ap.add_argument("--skip-reference-nockpt", action="store_true")
    ap.add_argument("--only-compiled", action="store_true", help="skip the reference and the eager variants")
    ap.add_argument("--base", nargs="+", default=["fp8"], choices=["fp8", "bf16"], help="frozen base precision(s)")
    ap.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--micro", action="store_true", help="first time single fp8 vs bf16 layers")
    ap.add_argument("--fp8-rowwise", action="store_true", help="per-row fp8 scales (default: per tensor)")
    ap.add_argument("--fp8-bf16-backward", action="store_true", help="input gradient in bf16 (default: fp8)")
    ap.add_argument("--fp8-storage-only", action="store_true", help="fp8 weights, bf16 matmuls")
    ap.add_argument("--profile", action="store_true", help="also print each variant's GPU kernel time per step")
    ap.add_argument("--lowvram", action="store_true", help="only the quantize_base / adamw8bit table")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    cfg, dev = (TINY if args.tiny else FULL), args.device
    if dev.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # see docs/training.md: cuDNN attention backward crashed
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    res_list = [r if not args.tiny else 64 for r in args.res]
    if args.lowvram:
        lowvram(cfg, dev, res_list[0], args.steps, args.warmup)
        return
    # 0. fp8 layer sanity: forward and input-gradient error against bf16 on a FLUX-sized layer.
    lin = torch.nn.Linear(3072, 3072, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(4096, 3072, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ref_out = lin(x)
    ref_out.float().pow(2).sum().backward()
    gx, x.grad = x.grad, None
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())  # noqa: E731
    for rowwise in (False, True):
        fp8 = __import__("flywheel.training.fp8", fromlist=["x"]).fp8_frozen_linear_cls()(lin, rowwise=rowwise)
        out = fp8(x)
        out.float().pow(2).sum().backward()
        print(f"fp8 layer ({'per-row' if rowwise else 'per-tensor'} scales) vs bf16: forward rel. error "
              f"{rel(out, ref_out):.4f}, input grad {rel(x.grad, gx):.4f}", flush=True)
        x.grad = None
    del lin, fp8, x, gx, out, ref_out
    if args.micro and dev.startswith("cuda"):
        micro(dev)
    results: dict[tuple[str, int], tuple[float, float]] = {}

    def report(name: str, res: int, dt: float, peak: float) -> None:
        results[(name, res)] = (dt, peak)
        ref = results.get(("reference (ckpt)", res))
        ratio = f"  {ref[0] / dt:4.2f}x faster than reference" if ref and name != "reference (ckpt)" else ""
        print(f"{name:34s} {res:5d}²  {dt:7.3f} s/step  peak {peak:6.1f} GiB{ratio}", flush=True)

    # 1. Reference: diffusers + peft, bf16, checkpointing (and without, at the first resolution).
    if not args.only_compiled:
        run_reference(args, cfg, dev, res_list, report)

    # 2. Flywheel: fp8 frozen base, fp32 LoRA, checkpointing on every N-th block, optional compile.
    variants = ([] if args.only_compiled else [(n, False) for n in args.ckpt_every]) + (
        [(n, True) for n in args.ckpt_every] if args.compile else [])
    for base, (every, compiled) in [(b, v) for b in args.base for v in variants]:
        tr, params = build(cfg, dev, getattr(torch, args.lora_dtype))
        if base == "fp8":
            convert_to_fp8(tr, rowwise=args.fp8_rowwise, fp8_backward=not args.fp8_bf16_backward,
                           fp8_compute=not args.fp8_storage_only)
        free()
        checkpoint_blocks(tr, every)
        if compiled:
            for block in (*tr.transformer_blocks, *tr.single_transformer_blocks):
                block.compile()
        opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.startswith("cuda"))
        gen = torch.Generator().manual_seed(0)
        lora = "" if args.lora_dtype == "float32" else " bf16-LoRA"
        recipe = ("-row" if args.fp8_rowwise else "") + ("-bf16bwd" if args.fp8_bf16_backward else "") + (
            "-storage" if args.fp8_storage_only else "")
        name = f"flywheel {base}{recipe if base == 'fp8' else ''}{lora} ckpt 1/{every}{' compile' if compiled else ''}"
        for res in res_list:
            batch = inputs(cfg, res, dev)
            try:
                dt, peak = measure(partial(train_step, tr, opt, batch, gen, params=params), dev, args.steps,
                                   args.warmup + (2 if compiled else 0))
            except torch.OutOfMemoryError:
                print(f"{name:34s} {res:5d}²  out of memory", flush=True)
                free()
                continue
            report(name, res, dt, peak)
        del tr, params, opt
        free()



LOWVRAM = [("bf16", "none", "adamw"), ("fp8 (flywheel)", "fp8", "adamw"), ("fp8 (torchao)", "fp8-torchao", "adamw"),
           ("int8 (torchao)", "int8", "adamw"), ("nf4 (bitsandbytes)", "nf4", "adamw"),
           ("nf4 + AdamW8bit", "nf4", "adamw8bit")]


def lowvram(cfg: dict, dev: str, res: int, steps: int, warmup: int) -> None:
    """Each quantize_base option as flywheel train applies it; the bf16 base is the baseline of this run."""
    import torch

    from flywheel.training import quantize
    from flywheel.training.flux_step import train_step

    # 0. Accuracy: one FLUX-sized layer (3072 -> 3072 at full size), output and input gradient vs bf16.
    k = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    torch.manual_seed(0)
    x = torch.randn(4096, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lin = torch.nn.Linear(k, k, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    ref = lin(x)
    (gref,) = torch.autograd.grad(ref.float().pow(2).sum(), x)
    rel = lambda a, b: float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())  # noqa: E731
    for _, mode, _ in LOWVRAM[1:5]:
        try:
            holder = torch.nn.Sequential(torch.nn.Linear(k, k, device=dev, dtype=torch.bfloat16).requires_grad_(False))
            holder[0].load_state_dict(lin.state_dict())
            quantize.quantize_linears(holder, mode)
            out = holder(x)
            (g,) = torch.autograd.grad(out.float().pow(2).sum(), x)
            print(f"layer {k}x{k} {mode:12s} vs bf16: output rel. error {rel(out, ref):.4f}, "
                  f"input grad {rel(g, gref):.4f}", flush=True)
        except Exception as err:  # noqa: BLE001 - a benchmark row records the failure and goes on
            print(f"layer {mode:12s} FAILED: {type(err).__name__}: {err}", flush=True)
    del x, lin, ref, gref
    free()

    base = None
    for name, mode, optim in LOWVRAM:
        tr = opt = params = None
        try:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device(dev):
                    tr = __import__("diffusers").FluxTransformer2DModel(**cfg)
            finally:
                torch.set_default_dtype(torch.float32)
            tr.requires_grad_(False)
            # The order flywheel train uses: int8 / nf4 before the LoRA, fp8 after it.
            if mode in quantize.BEFORE_LORA:
                quantize.quantize_base(tr, mode, dev)
            tr.add_adapter(__import__("peft").LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                                         target_modules=TARGETS))
            if mode == "fp8":
                quantize.quantize_base(tr, mode, dev)
            params = [p for p in tr.parameters() if p.requires_grad]
            for p in params:
                p.data = p.data.float()
            tr.enable_gradient_checkpointing()
            tr.train()
            free()
            setup = time.perf_counter() - t0
            opt = (__import__("bitsandbytes").optim.AdamW8bit(params, lr=1e-4) if optim == "adamw8bit"
                   else torch.optim.AdamW(params, lr=1e-4))
            gen = torch.Generator().manual_seed(0)
            batch = inputs(cfg, res, dev)
            dt, peak = measure(partial(train_step, tr, opt, batch, gen, params=params), dev, steps, warmup)
            base = base or (dt, peak)
            print(f"{name:22s} {res:5d}² ckpt  {dt:7.3f} s/step ({dt / base[0]:4.2f}x bf16)  peak {peak:6.1f} GiB "
                  f"({peak / base[1]:4.2f}x)  setup {setup:5.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - one failing option must not cost the others' numbers
            print(f"{name:22s} FAILED: {type(err).__name__}: {str(err)[:400]}", flush=True)
        del tr, opt, params
        free()


def run_reference(args, cfg, dev, res_list, report) -> None:
    import torch

    tr, params = build(cfg, dev, torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-4)
    tr.enable_gradient_checkpointing()
    for res in res_list:
        batch = inputs(cfg, res, dev)
        report("reference (ckpt)", res, *measure(partial(reference_step, tr, opt, batch, params), dev,
                                                 args.steps, args.warmup))
    if not args.skip_reference_nockpt:
        tr.disable_gradient_checkpointing()
        batch = inputs(cfg, res_list[0], dev)
        report("reference (no ckpt)", res_list[0], *measure(partial(reference_step, tr, opt, batch, params), dev,
                                                            args.steps, args.warmup))
    del tr, params, opt
    free()


if __name__ == "__main__":
    main()
