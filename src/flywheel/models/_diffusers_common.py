"""Loading helpers shared by the diffusers editor adapters (Qwen-Image-Edit, InstructPix2Pix)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flywheel.errors import ConfigError, MissingExtraError, ModelLoadError
from flywheel.models.hub import check_gpu_memory, count_parameters, estimate_bytes

log = logging.getLogger(__name__)


def load_pipeline(cls, folder: Path, *, label: str, device: str, dtype: str | None, cpu_offload: bool,
                  quantization: str, vae_tiling: bool | None = None, quantize: tuple[str, ...] = ("transformer",),
                  place: bool = True, check_precision: str | None = None, **kwargs: Any):
    """``cls.from_pretrained`` with safetensors only, the right dtype, optional quantization and offload:
    the one way every diffusers pipeline (editors, FLUX base for generation and training) is loaded.

    ``quantization``: "nf4" / "int8" through diffusers' ``PipelineQuantizationConfig`` (bitsandbytes) at
    load time, for the ``quantize`` components; "fp8" stores those components' weights in float8 and
    computes in ``dtype`` (diffusers' layerwise casting). ``place=False`` leaves the components on the CPU
    for a caller that moves them itself (the trainer; ``check_precision`` is then the precision its
    ``quantize`` components will have on the GPU, for the memory check). ``vae_tiling`` (default: on with ``cpu_offload``)
    bounds VAE memory on large images; it is slower, so it is off when memory is not the constraint.
    """
    import torch

    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if quantization in ("nf4", "int8"):
        if device != "cuda":
            raise ConfigError(f"quantization = {quantization!r} needs a CUDA GPU; this run is on {device}",
                              hint='set quantization = "none" (or "fp8") in [models], or run on a GPU')
        kwargs["quantization_config"] = _pipeline_quantization(quantization, torch_dtype, quantize)
    elif quantization not in ("none", "fp8"):
        raise ConfigError(f"unknown quantization {quantization!r}", hint="use none, fp8, nf4 or int8")
    if device == "cuda":
        precision = check_precision or quantization
        precision = precision if precision != "none" else str(torch_dtype).removeprefix("torch.")
        n_params, needed = needed_bytes(folder, precision, str(torch_dtype).removeprefix("torch."), quantize,
                                        whole=place and not cpu_offload)
        check_gpu_memory(label, needed, torch.cuda.mem_get_info()[0], precision=precision, n_params=n_params)
    from flywheel.progress import apply_third_party_bars

    apply_third_party_bars()  # diffusers' loading bars follow the CLI's -v (imported only now)
    try:
        pipe = cls.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"cannot load {label} as {cls.__name__} from {folder}: {err}".split("\n")[0],
                             hint="check that the folder is a complete diffusers download (model_index.json, "
                             "one subfolder per component, *.safetensors)") from None
    if quantization == "fp8":  # weights stored in fp8, each layer cast up to `dtype` when it runs
        for name in quantize:
            component = getattr(pipe, name, None)
            if component is not None and hasattr(component, "enable_layerwise_casting"):
                component.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch_dtype)
    if place and cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    elif place:
        pipe.to(device)
    vae = getattr(pipe, "vae", None)
    if (cpu_offload if vae_tiling is None else vae_tiling) and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    if hasattr(vae, "enable_slicing"):
        # A batch is decoded one image at a time: the decoder's full-resolution activations take GiBs per 1 MP
        # image, and one image already keeps the GPU busy. klein-4B's generate (batch 4) peaked at 23.0 GiB at
        # a 24 GiB cap on the H200 without this; the saving there is not measured yet.
        vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s) on %s, %s, offload=%s, quantization=%s", label, cls.__name__, device, torch_dtype,
             cpu_offload, quantization)
    return pipe, torch_dtype


def needed_bytes(folder: Path, precision: str, dtype: str, quantized: tuple[str, ...], *,
                 whole: bool) -> tuple[int, int]:
    """(parameters, GPU bytes to expect) for a diffusers folder: every component at once when ``whole``,
    else the largest one (model offload keeps one component on the GPU at a time; a trainer moves them)."""
    per_component = []
    total_params = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        n_params, _ = count_parameters(sub)
        if not n_params:
            continue
        total_params += n_params
        per_component.append(estimate_bytes(n_params, precision if sub.name in quantized else dtype))
    if not per_component:  # not a diffusers layout: count the folder as one block
        total_params, _ = count_parameters(folder)
        per_component = [estimate_bytes(total_params, precision)]
    return total_params, sum(per_component) if whole else max(per_component)


def _pipeline_quantization(quantization: str, compute_dtype, components: tuple[str, ...]):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingExtraError("bitsandbytes", "gpu", f"{quantization} quantization") from None
    from diffusers.quantizers import PipelineQuantizationConfig

    if quantization == "nf4":
        backend, kw = "bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                            "bnb_4bit_compute_dtype": compute_dtype}
    elif quantization == "int8":
        backend, kw = "bitsandbytes_8bit", {"load_in_8bit": True}
    else:
        raise ConfigError(f"unknown quantization {quantization!r}", hint="use none, nf4 or int8")
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kw, components_to_quantize=list(components))


def output_size(width: int, height: int, max_area: int, multiple: int = 32) -> tuple[int, int]:
    """Keep the source's aspect ratio at about ``max_area`` pixels, sides rounded to ``multiple``."""
    ratio = width / height
    w = math.sqrt(max_area * ratio)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(w / ratio / multiple) * multiple)


def generator(seed: int, device: str):
    import torch

    return torch.Generator(device="cpu" if device != "cuda" else "cuda").manual_seed(seed)
