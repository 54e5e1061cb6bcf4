"""FLUX.1 family: text-to-image (FLUX.1-dev / schnell + LoRA) and FLUX.1 Kontext editing, via diffusers.

Both adapters load one diffusers folder (or hub id) with ``use_safetensors=True`` and draw each image's
starting noise from its own ``torch.Generator`` seeded with the request's seed, so an image depends on its
seed and not on which batch it landed in. ``params()`` is what the catalog records with every call.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.errors import ModelLoadError, ModelNotFoundError
from flywheel.models.base import EditRequest, TextToImageRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "fp8", "int8", "nf4")
T2I_DEFAULTS: dict[str, Any] = {"num_inference_steps": 28, "guidance_scale": 3.5, "max_sequence_length": 512}
KONTEXT_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 28, "guidance_scale": 2.5, "max_sequence_length": 512, "auto_resize": True,
}


def _resolve(path_or_id: str | Path) -> str:
    """A local folder as is; anything else goes through the hub resolver (which explains missing weights)."""
    text = str(path_or_id)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(
                f"{local} is not a diffusers pipeline folder (no model_index.json)",
                hint="point to the folder that holds model_index.json, transformer/, vae/, ...",
            )
        return str(local)
    from flywheel.models.hub import resolve_model

    return str(resolve_model(text))  # a missing folder or an undownloaded hub id is explained there


def _device_dtype(device: str | None, dtype: Any) -> tuple[str, Any]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:  # bf16 is what FLUX was trained in; CPUs are faster and exact in fp32
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def _locate(path_or_id, *, dtype, device, quantization) -> tuple[str, str, str]:
    """(folder, device, dtype name) of a FLUX load: the quantization checked, the folder or hub id resolved,
    "auto" or no device picked, and the dtype FLUX was trained in on a GPU (float32 on a CPU) unless given."""
    from flywheel.models.hub import pick_device

    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}", hint=f"use one of {', '.join(QUANTIZATIONS)}")
    source = _resolve(path_or_id)
    device, dtype = _device_dtype(pick_device(device or "auto"), dtype)
    return source, device, str(dtype).removeprefix("torch.")


def _load_pipeline(cls, path_or_id, *, dtype, device, cpu_offload, quantization, place: bool = True,
                   check_precision: str | None = None):
    """The FLUX folder through the shared diffusers loader (dtype, quantization of the transformer, offload,
    memory check); ``place=False`` leaves it on the CPU for the trainer, which places components itself."""
    from flywheel.models._diffusers_common import load_pipeline

    source, device, dtype_name = _locate(path_or_id, dtype=dtype, device=device, quantization=quantization)
    pipe, dtype = load_pipeline(cls, Path(source), label=source, device=device, dtype=dtype_name,
                                cpu_offload=cpu_offload, quantization=quantization, place=place,
                                check_precision=check_precision)
    return pipe, source, device, dtype


def _generators(seeds: list[int], device: str) -> list:
    import torch

    gen_device = "cpu" if device.startswith("cpu") else device
    return [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]


class FluxTextToImage:
    """FLUX.1-dev / schnell text-to-image with optional LoRAs (TextToImage protocol)."""

    # Said when a LoRA does not load: which LoRAs this family takes (a subclass for another family names its own).
    lora_hint = "is it a FLUX.1 LoRA (diffusers or kohya keys) trained on FLUX.1-dev or this base?"

    def __init__(self, pipe, model_id: str, *, device: str, dtype: Any, cpu_offload: bool, quantization: str,
                 defaults: dict[str, Any]):
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.quantization = quantization
        self.defaults = defaults
        self.loras: list[dict[str, Any]] = []

    def load_lora(self, path: str, *, name: str, scale: float = 1.0) -> None:
        """Load a LoRA (.safetensors file, or a folder holding pytorch_lora_weights.safetensors) and activate it."""
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelNotFoundError(f"LoRA weights not found: {p}", hint="check the path, or run `flywheel train` first")
        kwargs = {"weight_name": p.name} if p.is_file() else {}
        if p.is_file() and p.suffix != ".safetensors":
            raise ModelLoadError(f"{p} is not a .safetensors file", hint="Flywheel only loads safetensors LoRAs")
        try:
            self.pipe.load_lora_weights(str(p.parent if p.is_file() else p), adapter_name=name, use_safetensors=True,
                                        **kwargs)
        except (ValueError, KeyError, OSError, RuntimeError) as err:  # RuntimeError: a LoRA of other layer sizes
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # torch lists every mismatch
            detail = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
            raise ModelLoadError(f"cannot load LoRA {p} into {self.model_id}: {detail}", hint=self.lora_hint) from err
        if self.quantization == "fp8":  # peft gives new LoRA layers the base weights' dtype: fp8 cannot matmul
            for param_name, param in self.pipe.transformer.named_parameters():
                if "lora_" in param_name:
                    param.data = param.data.to(self.dtype)
        self.loras.append({"name": name, "path": str(p), "scale": float(scale)})
        self.pipe.set_adapters([lo["name"] for lo in self.loras], [lo["scale"] for lo in self.loras])

    def unload_lora(self) -> None:
        """Remove every loaded LoRA; the base weights are exactly as loaded again (unless fused)."""
        self.pipe.unload_lora_weights()
        self.loras = []

    def fuse_lora(self) -> None:
        """Merge the active LoRAs into the base weights (faster inference; unload_lora can no longer undo it)."""
        self.pipe.fuse_lora(adapter_names=[lo["name"] for lo in self.loras])
        for lo in self.loras:
            lo["fused"] = True

    def params(self) -> dict[str, Any]:
        return {
            "model": self.model_id, "family": "flux", "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device, "cpu_offload": self.cpu_offload, "quantization": self.quantization,
            **self.defaults, "loras": [dict(lo) for lo in self.loras],
        }

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype=None, device: str | None = None, cpu_offload: bool = False,
                        quantization: str = "none", **defaults: Any) -> FluxTextToImage:
        from diffusers import FluxPipeline

        pipe, source, device, dtype = _load_pipeline(FluxPipeline, path_or_id, dtype=dtype, device=device,
                                                     cpu_offload=cpu_offload, quantization=quantization)
        return cls(pipe, source, device=device, dtype=dtype, cpu_offload=cpu_offload, quantization=quantization,
                   defaults={**T2I_DEFAULTS, **defaults})

    def generate(self, requests: list[TextToImageRequest], *, batch_size: int = 4) -> list[Image.Image]:
        """One image per request, same order. Requests of the same size run together, ``batch_size`` at a time."""
        out: list[Image.Image | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.width, r.height)].append(i)
        for (width, height), idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                images = self.pipe(
                    prompt=[requests[i].prompt for i in chunk], width=width, height=height,
                    generator=_generators([requests[i].seed for i in chunk], self.device), **self.defaults,
                ).images
                for i, im in zip(chunk, images):
                    out[i] = im
        return out  # type: ignore[return-value]


class FluxKontextEditor(DiffusersEditor):
    """FLUX.1 Kontext [dev] instruction editing (ImageEditor protocol). Kontext takes one image per edit.

    Editor LoRAs (``loras``: hub files or local .safetensors, e.g. a few-step turbo LoRA) are applied once
    at load time through ``flywheel.models.editor_options`` and recorded in ``params()``.
    """

    family = "flux"

    def __init__(self, pipe, *, scheduler_shift: float | None = None, **common: Any):
        super().__init__(pipe, **common)
        self.scheduler_shift = scheduler_shift

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype=None, device: str | None = None, cpu_offload: bool = False,
                        quantization: str = "none", **settings: Any) -> FluxKontextEditor:
        """A folder or hub id (recorded as the resolved folder); ``settings``: the sampler settings (over
        ``KONTEXT_DEFAULTS``), ``loras`` and ``scheduler_shift``."""
        source, device, dtype = _locate(path_or_id, dtype=dtype, device=device, quantization=quantization)
        return super().from_pretrained(source, device=device, dtype=dtype, cpu_offload=cpu_offload,
                                       quantization=quantization, **settings)

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        from diffusers import FluxKontextPipeline

        return PipelineSpec(FluxKontextPipeline, KONTEXT_DEFAULTS,
                            state={"scheduler_shift": settings.pop("scheduler_shift", None)})

    @classmethod
    def loaded(cls, pipe, spec: PipelineSpec) -> None:
        from flywheel.models.editor_options import set_scheduler_shift

        if spec.state["scheduler_shift"]:
            set_scheduler_shift(pipe, spec.state["scheduler_shift"])

    def edit(self, requests: list[EditRequest], *, batch_size: int | None = None) -> list[Image.Image]:
        """One output per request, same order, keeping the source's aspect ratio at ``max_area`` pixels (with
        ``auto_resize`` and no ``max_area``: Kontext's 1 MP; with neither: the input's size rounded down to a
        multiple of 16). ``auto_resize`` also snaps the input image to Kontext's preferred resolutions.
        Requests of one output size run as one call (``batch_size`` at a time when given), each with its own
        seeded generator."""
        from flywheel.models._diffusers_common import output_size

        opts = dict(self.settings)
        auto_resize = bool(opts.pop("auto_resize", True))
        max_area = opts.pop("max_area", None) or (1024 * 1024 if auto_resize else None)
        if opts.get("true_cfg_scale", 1.0) <= 1.0:
            opts.pop("negative_prompt", None)  # only read with true CFG
        if any(r.references for r in requests):
            log.debug("FLUX.1 Kontext takes one image per edit; extra reference images are not used")
        out: list[Image.Image | None] = [None] * len(requests)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            w, h = r.image.size
            groups[output_size(w, h, max_area, multiple=16) if max_area else (w // 16 * 16, h // 16 * 16)].append(i)
        for (width, height), idx in groups.items():
            step = batch_size or len(idx)
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                call = dict(opts)
                if "negative_prompt" in call:  # one per prompt, or the negative branch has the wrong batch size
                    call["negative_prompt"] = [call["negative_prompt"]] * len(chunk)
                images = self.pipe(
                    image=[requests[i].image.convert("RGB") for i in chunk], prompt=[requests[i].prompt for i in chunk],
                    generator=_generators([requests[i].seed for i in chunk], self.device), _auto_resize=auto_resize,
                    width=width, height=height, max_area=width * height, **call,
                ).images
                for i, im in zip(chunk, images):
                    out[i] = im
        return out  # type: ignore[return-value]

    def family_params(self) -> dict[str, Any]:
        return {"scheduler_shift": self.scheduler_shift}

    def params(self) -> dict[str, Any]:
        # FLUX rows have always recorded the dtype as "bfloat16", the other editors' as "torch.bfloat16".
        return {**super().params(), "dtype": str(self.dtype).replace("torch.", "")}
