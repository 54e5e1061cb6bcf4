"""A quantized frozen base for low-VRAM LoRA training, through maintained libraries where they fit.

``[train] quantize_base`` picks how the frozen Linear weights inside the transformer blocks are stored:

- ``"int8"``: torchao ``Int8WeightOnlyConfig`` (per-row int8 weights; torchao multiplies in bf16 on the
  weight cast up on the fly). Applied before the LoRA: peft wraps the quantized layers (``TorchaoLoraLinear``).
- ``"nf4"``: bitsandbytes ``Linear4bit`` with NF4 weights and double-quantized scales (QLoRA's recipe),
  bf16 compute. Applied before the LoRA: peft wraps them (its bnb ``Linear4bit`` LoRA layer).
- ``"fp8"``: ``flywheel.training.fp8`` (per-row e4m3 weights, bf16 matmuls). Applied after the LoRA, on
  the wrappers' base layers. Kept over torchao's float8 weight-only: on par to slightly better in speed and
  memory (docs/training.md), no optional library, and it runs (and is tested) on the CPU.

int8 and nf4 need CUDA (the point is VRAM; bitsandbytes' CPU kernels are a fallback, not a training path).
Blocks are moved to the GPU and quantized one at a time, so the bf16 base (22 GiB for FLUX.1-dev) never
has to fit on the card whole.
"""

from __future__ import annotations

import logging

from flywheel.errors import MissingExtraError, StageError

log = logging.getLogger(__name__)

BEFORE_LORA = ("int8", "nf4", "fp8-torchao")  # fp8-torchao: benchmarks/train_step.py's comparison only
LIBRARY = {"int8": "torchao", "fp8-torchao": "torchao", "nf4": "bitsandbytes"}


def check_quantize_support(mode: str, device: str) -> None:
    """Fail before any loading if ``mode`` cannot run on ``device`` or its library is not installed."""
    if mode not in LIBRARY:
        return
    if not str(device).startswith("cuda"):
        raise StageError(
            f"[train] quantize_base = {mode!r} needs a CUDA GPU ({LIBRARY[mode]}), and this run is on {device!r}",
            hint="set [train] quantize_base = 'fp8' (also halves the base's memory, runs on any device) or 'none'")
    try:
        __import__(LIBRARY[mode])
    except ImportError:
        raise MissingExtraError(LIBRARY[mode], "lowvram", f"[train] quantize_base = {mode!r}") from None


def quantize_linears(module, mode: str) -> int:
    """Quantize the frozen ``nn.Linear`` layers in ``module`` (where they are: on the GPU for real runs), in
    place. Returns how many. LoRA layers (``lora_*``) are never touched."""
    import torch

    targets = [(parent, name, child) for parent in list(module.modules()) for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and not child.weight.requires_grad and "lora_" not in name]
    if not targets:
        return 0
    if mode in ("int8", "fp8-torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig(set_inductor_config=False) if mode == "int8" else Float8WeightOnlyConfig()
        for _, _, child in targets:
            quantize_(child, config)
    elif mode == "nf4":
        import bitsandbytes as bnb

        for parent, name, child in targets:
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=child.weight.dtype, quant_type="nf4", device="meta")
            # Params4bit quantizes when it moves to a device; the bf16 weight is dropped with `child`.
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
    elif mode == "fp8":
        from flywheel.training.fp8 import fp8_frozen_linear_cls

        cls = fp8_frozen_linear_cls()
        for parent, name, child in targets:
            setattr(parent, name, cls(child, rowwise=True, fp8_compute=False))
    else:
        raise StageError(f"unknown quantize_base {mode!r}", hint="use 'none', 'fp8', 'int8' or 'nf4'")
    return len(targets)


def quantize_base(transformer, mode: str, device: str) -> int:
    """Move the transformer blocks to ``device`` one at a time, quantizing each on arrival; then the rest.
    For int8 / nf4 call it before ``add_adapter``, for fp8 after. Returns how many Linears were quantized."""
    import torch

    n = 0
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.to(device)
        n += quantize_linears(block, mode)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    if mode == "nf4":
        transformer.is_loaded_in_4bit = True  # tells peft to use its bitsandbytes 4-bit LoRA layer
    transformer.to(device)
    log.info("frozen base: %d Linear layers quantized to %s", n, mode)
    return n
