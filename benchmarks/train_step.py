"""FLUX.1-dev LoRA training step: Flywheel's step against a plain diffusers + peft reference, in one run.

Full FLUX.1-dev size (11.9 B parameters) with random bf16 weights built on the GPU (speed and memory do
not depend on the values), batch 1, 512 T5 tokens, LoRA rank 16 on to_q/k/v/out.0. Prints the GPU, then
for each variant and resolution the mean step time and the peak GPU memory, and the ratio to the
reference measured in the same run.

- reference: the recipe of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: bf16 base and
  bf16 LoRA under bf16 autocast, gradient checkpointing on every block, uniform t, AdamW, grad clipping.
- flywheel: ``flywheel.training.flux_step.train_step`` (the step ``flywheel train`` runs), fp32 LoRA, set
  up as ``flywheel train`` does: the stored base, then ``flywheel.training.speed.apply`` with a [train]
  config. ``--variants`` names them: ``default`` is TrainConfig's defaults (what ``flywheel train`` runs
  on this device); overrides join with '+': bf16 | fp8 (fp8-stored, bf16 matmuls) | fp8mm (fp8 matmuls),
  ckptN (every N-th block, 0 = none), compile | eager, budgetX, attn=flash|cudnn|efficient, nofused.
``--lowvram`` instead times ``flywheel train``'s low-VRAM options against its bf16 base in one run: the
frozen base as bf16, fp8 (flywheel.training.fp8, what quantize_base = "fp8" does), torchao float8
weight-only (for comparison), torchao int8 and bitsandbytes NF4 (``flywheel.training.quantize``, the code
``flywheel train`` runs), and NF4 with bitsandbytes' AdamW8bit; fp32 LoRA, checkpointing on every block.
It first prints each option's error against bf16 on one FLUX-sized layer.
Results and what they mean: docs/training.md.

    python benchmarks/train_step.py                 # GPU, full size: reference and default, 1024² and 512²
    python benchmarks/train_step.py --variants default bf16+ckpt1+eager fp8mm+ckpt0+compile --res 1024
    python benchmarks/train_step.py --lowvram --res 1024 --warmup 2 --steps 5
    python benchmarks/train_step.py --tiny --device cpu --steps 2   # dry run of the code paths
"""

from __future__ import annotations

import argparse
import gc
import time
from functools import partial
from pathlib import Path

FULL = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
            num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
            axes_dims_rope=(16, 56, 56))
TINY = dict(attention_head_dim=16, guidance_embeds=True, in_channels=64, joint_attention_dim=32, num_attention_heads=2,
            num_layers=2, num_single_layers=2, patch_size=1, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
PROFILE = False
TRACE = None  # --trace DIR: a Path


def build(cfg: dict, device: str, lora_dtype, model_cls=None):
    """A random bf16 transformer (FLUX.1's, or ``model_cls``) built on ``device``, frozen, with the LoRA."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            tr = (model_cls or FluxTransformer2DModel)(**cfg)
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
    """Seconds of GPU kernel time in one step (torch.profiler): against wall time, shows CPU-boundness. With
    ``--trace DIR`` the step's CPU + GPU timeline also goes to DIR/stepN.json.gz (chrome://tracing, Perfetto),
    and the GPU's idle gaps inside the step are summed (``trace_gaps``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if TRACE else [])
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    if TRACE:
        import gzip
        import json

        TRACE.mkdir(parents=True, exist_ok=True)
        raw = TRACE / f"step{len(list(TRACE.glob('step*.json.gz')))}.json"
        prof.export_chrome_trace(str(raw))  # torch writes plain JSON only
        text = raw.read_text()
        raw.unlink()
        with gzip.open(raw.with_suffix(".json.gz"), "wt") as out:
            out.write(text)
        gaps = trace_gaps(json.loads(text))
        print(f"    GPU idle inside the step {gaps['idle_s'] * 1e3:.1f} ms in {gaps['gaps']} gaps > 50 us; largest "
              f"{', '.join(f'{g * 1e3:.1f} ms before {n[:40]}' for g, n in gaps['largest'])}  "
              f"({raw.with_suffix('.json.gz').name})", flush=True)
        return gaps["busy_s"]
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def trace_gaps(trace: dict, min_us: float = 50.0, top: int = 5) -> dict:
    """GPU time of a chrome trace's kernels / copies (``busy_s``), and the idle time between the first and the
    last: the sum of gaps longer than ``min_us`` and the ``top`` largest, each with the GPU work that follows."""
    work = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in trace.get("traceEvents", [])
                  if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    gaps, end = [], None
    for start, stop, name in work:
        if end is not None and start - end > min_us:
            gaps.append(((start - end) / 1e6, name))
        end = stop if end is None else max(end, stop)
    busy = sum(stop - start for start, stop, _ in work) / 1e6
    return {"busy_s": busy, "idle_s": sum(g for g, _ in gaps), "gaps": len(gaps),
            "largest": sorted(gaps, reverse=True)[:top]}


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
    if device.startswith("cuda"):  # what a card must hold: CUDA graphs keep their own memory pool
        print(f"    peak reserved {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB", flush=True)
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


def variant_config(spec: str):
    """A [train] config from a variant spec: 'default' (TrainConfig's defaults, what `flywheel train` runs)
    plus '+'-joined overrides: bf16 | fp8 (fp8-stored base, bf16 matmuls) | fp8mm (fp8 matmuls); ckptN
    (checkpoint every N-th block, 0 = none); compile | eager; dyn (compile_dynamic: one graph for all shapes);
    graphs | nographs (cuda_graphs on / off); lora16 | lora32 (lora_compute bf16 / fp32);
    budgetX (activation_memory_budget); attn=NAME;
    nofused. Returns (TrainConfig, base quantization as stored before speed.apply)."""
    from flywheel.config import TrainConfig

    over: dict = {}
    base = "none"
    for tok in [t for t in spec.split("+") if t and t != "default"]:
        if tok in ("bf16", "fp8", "fp8mm"):
            base = "fp8" if tok == "fp8" else "none"
            over["fp8_matmul"] = "on" if tok == "fp8mm" else "off"
        elif tok.startswith("ckpt"):
            n = int(tok[4:])
            over.update(gradient_checkpointing=n > 0, checkpoint_every_n_blocks=max(n, 1))
        elif tok in ("compile", "eager"):
            over["compile"] = tok == "compile"
        elif tok == "dyn":
            over["compile_dynamic"] = True
        elif tok in ("graphs", "nographs"):
            over["cuda_graphs"] = "on" if tok == "graphs" else "off"
        elif tok.startswith("budget"):
            over["activation_memory_budget"] = float(tok[6:])
        elif tok.startswith("attn="):
            over["attention_backend"] = tok[5:]
        elif tok in ("lora16", "lora32"):
            over["lora_compute"] = "bf16" if tok == "lora16" else "fp32"
        elif tok == "nofused":
            over["fused_optimizer"] = False
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {spec!r}")
    return TrainConfig(**over), base


def run_variant(spec: str, cfg_dims: dict, dev: str, res_list, args, report) -> None:
    """One Flywheel variant as `flywheel train` sets it up: LoRA (fp32), the stored base, speed.apply, AdamW."""
    import torch

    from flywheel.training import quantize, speed
    from flywheel.training.flux_step import train_step

    cfg, base = variant_config(spec)
    torch._dynamo.reset()
    tr, params = build(cfg_dims, dev, torch.float32)
    if base == "fp8":
        quantize.quantize_base(tr, "fp8", dev)
    t0 = time.perf_counter()
    done = speed.apply(tr, cfg, dev, base_quantize=base)
    free()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=cfg.weight_decay, **speed.adamw_options(cfg, params))
    gen = torch.Generator().manual_seed(0)
    what = (f"fp8mm={done.fp8_matmul} attn={done.attention_backend} ckpt={done.checkpointed_blocks} "
            f"compiled={done.compiled_blocks} graphs={done.cuda_graphs} lora={done.lora_compute}")
    for res in res_list:
        batch = inputs(cfg_dims, res, dev)
        step = partial(train_step, tr, opt, batch, gen, params=params)
        try:
            t1 = time.perf_counter()
            step()  # the first step compiles (per shape); reported apart
            float(step())
            first = time.perf_counter() - t1
            dt, peak = measure(step, dev, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            print(f"flywheel {spec:30s} {res:5d}²  out of memory", flush=True)
            free()
            continue
        report(f"flywheel {spec}", res, dt, peak, f"  [{what}; first 2 steps {first:.1f} s]")
    del tr, params, opt
    free()
    print(f"    (setup {time.perf_counter() - t0:.1f} s)", flush=True)


def probe_torchao(dev: str) -> None:
    """Can torchao's fp8 inference path (fp8 weights stored) give an input gradient? (speed.py's docstring)"""
    import torch

    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        m = torch.nn.Sequential(torch.nn.Linear(256, 256, device=dev, dtype=torch.bfloat16)).requires_grad_(False)
        quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
        m(x).float().sum().backward()
        print(f"torchao Float8DynamicActivationFloat8WeightConfig: backward ran, grad norm {float(x.grad.norm()):.3f}")
    except Exception as err:  # noqa: BLE001 - the probe reports what torchao does, whatever it raises
        print(f"torchao Float8DynamicActivationFloat8WeightConfig backward: {type(err).__name__}: {str(err)[:200]}")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="Flywheel variants (see variant_config), e.g. default fp8mm+ckpt2+compile bf16+ckpt1+eager")
    ap.add_argument("--no-reference", action="store_true", help="skip the diffusers + peft reference")
    ap.add_argument("--reference-nockpt", action="store_true", help="also the reference without checkpointing")
    ap.add_argument("--micro", action="store_true", help="first time single fp8 vs bf16 layers")
    ap.add_argument("--probe-torchao", action="store_true", help="first try torchao's fp8 weights with a backward")
    ap.add_argument("--profile", action="store_true", help="also print each variant's GPU kernel time per step")
    ap.add_argument("--trace", type=Path, default=None, help="with --profile: each profiled step's timeline "
                    "to DIR/stepN.json.gz and its GPU idle gaps")
    ap.add_argument("--lowvram", action="store_true", help="only the quantize_base / adamw8bit table")
    ap.add_argument("--family", choices=["flux1", "klein"], default="flux1",
                    help="klein: a FLUX.2 klein-base-4B LoRA step and its diffusers reference (klein_step.py)")
    args = ap.parse_args()
    global PROFILE, TRACE
    PROFILE, TRACE = args.profile or args.trace is not None, args.trace
    cfg, dev = (TINY if args.tiny else FULL), args.device
    if dev.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as flywheel train: cuDNN attention backward crashed
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    res_list = [r if not args.tiny else max(32, r // 16) for r in args.res]
    if args.family == "klein":  # benchmarks/klein_step.py: same options, the klein family's step
        import klein_step

        klein_step.run(args, res_list, measure=measure, variant_config=variant_config, free=free)
        return
    if args.lowvram:
        lowvram(cfg, dev, res_list[0], args.steps, args.warmup)
        return
    if args.probe_torchao:
        probe_torchao(dev)
    if args.micro and dev.startswith("cuda"):
        micro(dev)
    results: dict[tuple[str, int], tuple[float, float]] = {}

    def report(name: str, res: int, dt: float, peak: float, note: str = "") -> None:
        results[(name, res)] = (dt, peak)
        ref = results.get(("reference (ckpt)", res))
        ratio = f"  {ref[0] / dt:4.2f}x faster than reference" if ref and name != "reference (ckpt)" else ""
        print(f"{name:40s} {res:5d}²  {dt:7.3f} s/step  peak {peak:6.1f} GiB{ratio}{note}", flush=True)

    # 1. Reference: diffusers + peft, bf16, checkpointing (and without, at the first resolution).
    if not args.no_reference:
        run_reference(args, cfg, dev, res_list, report)
    # 2. Flywheel variants, each set up as flywheel train does it (speed.apply).
    for spec in args.variants:
        try:
            run_variant(spec, cfg, dev, res_list, args, report)
        except Exception as err:  # noqa: BLE001 - one failing variant must not cost the others' numbers
            print(f"flywheel {spec:30s} FAILED: {type(err).__name__}: {str(err)[:600]}", flush=True)
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
    if args.reference_nockpt:
        tr.disable_gradient_checkpointing()
        batch = inputs(cfg, res_list[0], dev)
        report("reference (no ckpt)", res_list[0], *measure(partial(reference_step, tr, opt, batch, params), dev,
                                                            args.steps, args.warmup))
    del tr, params, opt
    free()


if __name__ == "__main__":
    main()
