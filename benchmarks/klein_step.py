"""FLUX.2 klein-base-4B LoRA training step (``benchmarks/train_step.py --family klein``): Flywheel's step
against the plain diffusers + peft step, in one run.

klein-base-4B size (3.88 B transformer: 5 double + 20 single blocks, hidden 3072, Qwen3-4B context 7680,
128-channel latents) with random bf16 weights built on the GPU, batch 1, 512 text tokens, LoRA rank 16 on
to_q/k/v/out.0 (the double blocks' attention).

- reference: the loop body of diffusers' examples/dreambooth/train_dreambooth_lora_flux2_klein.py: bf16 base
  and bf16 LoRA under bf16 autocast, uniform t, AdamW, grad clipping; with gradient checkpointing on every
  block and without (issue 11 measured 0.363 s / 9.0 GiB and 0.260 s / 20.4 GiB at 1024² on an H200).
- flywheel: ``flywheel.training.step.train_step`` with the klein family (what ``flywheel train`` runs on a
  klein base), fp32 LoRA, set up as ``flywheel train`` does (``flywheel.training.speed.apply`` with a [train]
  config; variants as in train_step.py: ``default``, ``fp8mm+ckpt2+compile``, ...).

    python benchmarks/train_step.py --family klein --res 1024
    python benchmarks/train_step.py --family klein --tiny --device cpu --steps 2   # dry run of the code paths
"""

from __future__ import annotations

import time
from functools import partial

from fullsize import KLEIN_4B_TRANSFORMER as KLEIN_BASE_4B  # klein-base-4B has klein-4B's transformer shape
from train_step import TARGETS  # the LoRA targets train_step.build adds

TINY = dict(in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
TEXT_TOKENS = 512


def build(dims: dict, device: str, lora_dtype):
    """train_step.py's build with klein's transformer class (same LoRA targets)."""
    from diffusers import Flux2Transformer2DModel
    from train_step import build as build_with_lora

    return build_with_lora(dims, device, lora_dtype, model_cls=Flux2Transformer2DModel)


def inputs(dims: dict, res: int, device: str):
    """A cached klein batch: normalised 2x2-patchified latents (1, 128, res/16, res/16) and Qwen3 embeddings."""
    import torch

    from flywheel.training.flux_step import Batch

    g = torch.Generator(device).manual_seed(0)
    lat = torch.randn(1, dims["in_channels"], res // 16, res // 16, generator=g, device=device, dtype=torch.bfloat16)
    pe = torch.randn(1, TEXT_TOKENS, dims["joint_attention_dim"], generator=g, device=device, dtype=torch.bfloat16)
    return Batch(lat, pe, None)


def reference_step(tr, opt, batch, params):
    """diffusers' train_dreambooth_lora_flux2_klein.py loop body (weighting 'none': uniform t)."""
    import torch

    from flywheel.training.families.flux2_klein import latent_ids, pack, text_ids

    lat = batch.latents
    b, _, h, w = lat.shape
    noise = torch.randn_like(lat)
    t = torch.rand(b, device=lat.device)
    sig = t.view(b, 1, 1, 1).to(lat.dtype)
    noisy = (1 - sig) * lat + sig * noise
    with torch.autocast(lat.device.type, dtype=torch.bfloat16):
        pred = tr(hidden_states=pack(noisy), timestep=t.to(lat.dtype), guidance=None,
                  encoder_hidden_states=batch.prompt_embeds, txt_ids=text_ids(b, batch.prompt_embeds.shape[1], lat.device),
                  img_ids=latent_ids(b, h, w, lat.device), return_dict=False)[0]
    loss = torch.mean(((pred.float() - pack(noise - lat).float()) ** 2).reshape(b, -1), 1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def run(args, res_list, *, measure, variant_config, free) -> None:
    """Reference (checkpointing on every block, and without at the first resolution), then each variant."""
    import torch

    from flywheel.training import quantize, speed
    from flywheel.training.families.flux2_klein import Flux2Klein
    from flywheel.training.step import train_step

    dims, dev = (TINY if args.tiny else KLEIN_BASE_4B), args.device
    print(f"klein-base-4B LoRA step ({'tiny' if args.tiny else '3.88 B transformer'}, random bf16 weights, "
          f"rank 16 on {'/'.join(TARGETS)}, {TEXT_TOKENS} text tokens)", flush=True)
    results: dict[tuple[str, int], tuple[float, float]] = {}

    def report(name: str, res: int, dt: float, peak: float, note: str = "") -> None:
        results[(name, res)] = (dt, peak)
        ref = results.get(("reference (ckpt)", res))
        ratio = f"  {ref[0] / dt:4.2f}x faster than reference" if ref and not name.startswith("reference") else ""
        print(f"{name:40s} {res:5d}²  {dt:7.3f} s/step  peak {peak:6.1f} GiB{ratio}{note}", flush=True)

    if not args.no_reference:
        tr, params = build(dims, dev, torch.bfloat16)
        opt = torch.optim.AdamW(params, lr=1e-4)
        tr.enable_gradient_checkpointing()
        for res in res_list:
            report("reference (ckpt)", res, *measure(partial(reference_step, tr, opt, inputs(dims, res, dev), params),
                                                     dev, args.steps, args.warmup))
        tr.disable_gradient_checkpointing()
        report("reference (no ckpt)", res_list[0], *measure(
            partial(reference_step, tr, opt, inputs(dims, res_list[0], dev), params), dev, args.steps, args.warmup))
        del tr, params, opt
        free()
    family = Flux2Klein()
    for spec in args.variants:
        try:
            cfg, base = variant_config(spec)
            torch._dynamo.reset()
            tr, params = build(dims, dev, torch.float32)
            if base == "fp8":
                quantize.quantize_base(tr, "fp8", dev)
            done = speed.apply(tr, cfg, dev, base_quantize=base)
            free()
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=cfg.weight_decay, **speed.adamw_options(cfg, params))
            gen = torch.Generator().manual_seed(0)
            what = (f"fp8mm={done.fp8_matmul} attn={done.attention_backend} ckpt={done.checkpointed_blocks} "
                    f"compiled={done.compiled_blocks} graphs={done.cuda_graphs} lora={done.lora_compute}")
            for res in res_list:
                step = partial(train_step, family, tr, opt, inputs(dims, res, dev), gen, params=params)
                t1 = time.perf_counter()
                step()  # the first steps compile (per shape); reported apart
                float(step())
                first = time.perf_counter() - t1
                report(f"flywheel klein {spec}", res, *measure(step, dev, args.steps, args.warmup),
                       f"  [{what}; first 2 steps {first:.1f} s]")
            del tr, params, opt
        except Exception as err:  # noqa: BLE001 - one failing variant must not cost the others' numbers
            print(f"flywheel klein {spec:24s} FAILED: {type(err).__name__}: {str(err)[:600]}", flush=True)
        free()
