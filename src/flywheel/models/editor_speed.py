"""Inference speed for the diffusers editors: regional ``torch.compile`` and fp8 matmuls (``[enrich] speed``).

- ``compile``: ``compile_repeated_blocks`` (diffusers' regional compilation, issue #11705): each transformer
  block type is compiled once (``fullgraph``) and the compiled code is shared by all blocks of that type, so
  the compile takes seconds to a minute instead of a whole-model compile's minutes. A new image size
  recompiles once (then dynamic shapes); the limit is raised so a mix of aspect ratios stays compiled.
- ``compile-fp8``: first torchao's float8 dynamic activation + weight quantization (per-row scales) of the
  Linear layers inside those blocks, then the compile (the float8 kernels pay off only compiled). Needs
  CUDA with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) and torchao; it changes the
  outputs a little, so it is never chosen for you.
- ``auto``: ``compile`` on CUDA with the model unquantized and not offloaded, nothing elsewhere (inductor's
  CPU code is slow to build and rarely faster for these models; offload hooks and quantized layers do not
  compile as one graph). The klein-4B preset uses it: on the H200 a 1024² edit with two 512² references took
  0.90 s compiled against 1.12 s, after a first edit of 17.5 s (the compile): it pays off from about 80 edits
  in a process, sooner when inductor's on-disk cache already holds the graphs (a second run).
- ``none``: the pipeline as loaded.

The first edit after loading pays the compile (17.5 s for klein-4B on the H200); every later edit of the same
size runs the compiled blocks.
"""

from __future__ import annotations

import logging
from typing import Any

from flywheel.errors import ConfigError, MissingExtraError

log = logging.getLogger(__name__)

SPEEDS = ("none", "compile", "compile-fp8", "auto")
RECOMPILE_LIMIT = 64  # image sizes (one graph each until dynamic shapes kick in) x block types


def denoiser(pipe) -> Any:
    """The pipeline's repeated-block model: the transformer (FLUX, klein, Qwen, LongCat) or the UNet."""
    return getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)


def check_speed(speed: str, label: str = "editor") -> None:
    """A ``ConfigError`` for a speed that is not one of ``SPEEDS`` (checked before loading many GB)."""
    if speed not in SPEEDS:
        raise ConfigError(f"unknown speed {speed!r} for {label}", hint=f"use one of {', '.join(SPEEDS)}")


def apply_speed(pipe, speed: str, *, device: str, quantization: str = "none", cpu_offload: bool = False,
                label: str = "editor", backend: str = "inductor") -> str:
    """Apply ``speed`` (one of ``SPEEDS``) to ``pipe``'s denoiser in place; returns what was applied:
    "none", "compile" or "compile-fp8". ``backend``: torch.compile's (tests trace with "eager")."""
    check_speed(speed, label)
    if speed == "auto":  # compile where it is known to work: the whole model on one GPU, unquantized
        speed = "compile" if device == "cuda" and not cpu_offload and quantization == "none" else "none"
    if speed == "none":
        return "none"
    model = denoiser(pipe)
    if model is None or not getattr(model, "_repeated_blocks", None):
        raise ConfigError(f"speed = {speed!r}: {label} has no transformer blocks diffusers can compile regionally",
                          hint='remove speed from [enrich] (or set it to "none") for this editor')
    if cpu_offload:  # offload hooks move weights between devices inside the compiled region's calls
        raise ConfigError(f"speed = {speed!r} does not combine with cpu_offload ({label})",
                          hint='set [models] cpu_offload = false, or [enrich] speed = "none"')
    if speed == "compile-fp8":
        _fp8_matmuls(model, device=device, quantization=quantization, label=label)
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    log.info("%s: %s (regional torch.compile of %s; the first edit compiles)", label, speed,
             ", ".join(model._repeated_blocks))
    return speed


def _fp8_matmuls(model, *, device: str, quantization: str, label: str) -> None:
    """torchao float8 dynamic activation + weight (per row) on the Linear layers inside the repeated blocks."""
    import torch

    if quantization != "none":
        raise ConfigError(f"speed = 'compile-fp8' needs unquantized weights ({label} has quantization = "
                          f"{quantization!r})", hint='set [models] quantization = "none", or speed = "compile"')
    if device != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"speed = 'compile-fp8' needs a CUDA GPU; {label} runs on {device}",
                          hint='use speed = "auto" (compiles on CUDA only) or "none"')
    if torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"speed = 'compile-fp8' needs fp8 tensor cores (compute capability 8.9+); this GPU is "
                          f"{torch.cuda.get_device_name()}", hint='use speed = "compile"')
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise MissingExtraError("torchao", "gpu", "speed = 'compile-fp8'") from None
    blocks = set(model._repeated_blocks)
    inside = tuple(f"{name}." for name, module in model.named_modules() if type(module).__name__ in blocks)

    def in_blocks(module, fqn: str) -> bool:  # fp8 GEMMs need both dims divisible by 16
        return (isinstance(module, torch.nn.Linear) and fqn.startswith(inside) and module.in_features % 16 == 0
                and module.out_features % 16 == 0)

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=in_blocks)
