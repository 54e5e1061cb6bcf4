"""One place that loads every model Flywheel uses: ``load_vlm``, ``load_editor``, ``load_text_to_image``.

Each takes a spec (a preset name from ``flywheel.models.presets``, a local folder, or a hub id) and the
``[models]`` config section, finds the weights (``hub.resolve_model``: offline-aware, safetensors only),
reads the family from the preset or the folder, and returns that family's adapter. Adapters and heavy
libraries are imported only when a model is actually loaded.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.errors import ConfigError, ModelLoadError
from flywheel.models.presets import ROLE_OF_FAMILY, TINY_VERSION, Preset, Role, get_preset, suggest

if TYPE_CHECKING:
    from flywheel.config import ModelsConfig
    from flywheel.models.base import ImageEditor, TextToImage, VisionLanguageModel

log = logging.getLogger(__name__)

_PIPELINE_FAMILY = {
    "QwenImageEditPlusPipeline": "qwen_image_edit", "QwenImageEditPipeline": "qwen_image_edit",
    "StableDiffusionInstructPix2PixPipeline": "instruct_pix2pix",
    "FluxKontextPipeline": "flux_kontext", "FluxPipeline": "flux",
    "Flux2KleinPipeline": "flux2_klein", "Flux2KleinKVPipeline": "flux2_klein",
    "LongCatImageEditPipeline": "longcat_edit",
    "StableDiffusionXLInpaintPipeline": "sdxl_inpaint", "FluxFillPipeline": "flux_fill",
    "StableDiffusionXLControlNetPipeline": "sdxl_controlnet",
}
_ROLE_WORDS = {"vlm": "captioner/judge (a vision-language model)", "editor": "editor (an image-editing model)",
               "text_to_image": "base (a text-to-image model)"}


@dataclass
class ResolvedModel:
    """What a spec turned into: the folder to load, its family and the preset (if it was one)."""

    spec: str
    folder: Path
    family: str
    preset: Preset | None

    @property
    def label(self) -> str:
        return self.preset.name if self.preset else self.spec


def load_vlm(spec: str, models_cfg: ModelsConfig | None = None, **overrides: Any) -> VisionLanguageModel:
    """Captioner / judge adapter for ``spec`` (e.g. ``"qwen2-vl-2b"``, ``"tiny"`` or a folder)."""
    return load(spec, models_cfg, role="vlm", **overrides)


def load_editor(spec: str, models_cfg: ModelsConfig | None = None, **overrides: Any) -> ImageEditor:
    """Image-editing adapter (Qwen-Image-Edit(-Plus), FireRed, FLUX.1 Kontext, FLUX.2 klein, LongCat, pix2pix)."""
    return load(spec, models_cfg, role="editor", **overrides)


def load_text_to_image(spec: str, models_cfg: ModelsConfig | None = None, **overrides: Any) -> TextToImage:
    """Text-to-image adapter with LoRA support (FLUX.1-dev / schnell)."""
    return load(spec, models_cfg, role="text_to_image", **overrides)


def load(spec: str, models_cfg: ModelsConfig | None = None, *, role: Role | None = None, **overrides: Any):
    """Resolve ``spec`` and build its adapter; ``role`` (if given) must match the model's family."""
    from flywheel.config import ModelsConfig
    from flywheel.models.hub import check_cpu_for

    cfg = models_cfg or ModelsConfig()
    from flywheel.models.openai_common import is_api_spec

    if is_api_spec(spec):  # "api" / "api:<model>": an OpenAI-compatible service ([api], docs/api.md)
        from flywheel.models.openai_common import load_api

        return load_api(spec, role, **overrides)
    preset = get_preset(spec, role)
    if preset is not None and role is not None:
        _family_for_role(spec, preset.family, role)  # fail before any download
    if preset is not None:  # no CUDA GPU for a full-size preset: say so before a download of many GB
        check_cpu_for(spec, role, overrides.get("device") or cfg.for_role(role or preset.role)["device"])
    resolved = resolve(spec, role=role, trust_remote_code=cfg.trust_remote_code)
    family = _family_for_role(spec, resolved.family, role) if role else resolved.family
    settings = _settings(resolved, family, cfg, overrides)
    adapter = _ADAPTERS[family](resolved, settings)
    log.info("%s ready: %s", resolved.label, adapter.params())
    return adapter


def _family_for_role(spec: str, family: str, role: Role) -> str:
    if ROLE_OF_FAMILY[family] == role:
        return family
    if role == "editor" and family == "flux":
        return "flux_kontext"  # a FLUX.1 folder loads as Kontext too (same components)
    if {role, family} in ({"text_to_image", "flux2_klein"}, {"editor", "flux2_klein_t2i"}):
        return "flux2_klein_t2i" if role == "text_to_image" else "flux2_klein"  # one pipeline, both roles
    raise ConfigError(
        f"'{spec}' is a {family} model ({ROLE_OF_FAMILY[family]}), but it is used as the {_ROLE_WORDS[role]}",
        hint="pick a matching preset from `flywheel models list`",
    )


def resolve(spec: str, *, role: Role | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """Preset name / folder / hub id -> local folder + family (builds tiny presets on first use)."""
    from flywheel.models.hub import looks_like_path, resolve_model

    preset = get_preset(spec, role)
    if preset is not None:
        folder = tiny_folder(preset) if preset.tiny else resolve_model(preset.hub_id, name=preset.name,
                                                                        trust_remote_code=trust_remote_code)
        return ResolvedModel(spec, folder, preset.family, preset)
    if not looks_like_path(spec) and spec.count("/") != 1:
        close = suggest(spec)
        raise ConfigError(
            f"unknown model '{spec}': not a preset name, an existing folder or a hub id (owner/name)",
            hint=(f"did you mean '{close}'? " if close else "") + "see `flywheel models list`",
        )
    folder = resolve_model(spec, trust_remote_code=trust_remote_code)
    return ResolvedModel(spec, folder, detect_family(folder), None)


def detect_family(folder: Path) -> str:
    """Which adapter loads this folder, from config.json (transformers) or model_index.json (diffusers)."""
    from flywheel.models.hub import read_json

    if (folder / "model_index.json").exists():
        cls = read_json(folder / "model_index.json").get("_class_name", "")
        if cls in _PIPELINE_FAMILY:
            return _PIPELINE_FAMILY[cls]
        raise ModelLoadError(f"{folder} holds a {cls or 'unknown'} pipeline, which Flywheel has no adapter for",
                             hint=f"supported pipelines: {', '.join(_PIPELINE_FAMILY)}")
    config = read_json(folder / "config.json")
    model_type = str(config.get("model_type", ""))
    if model_type.startswith("qwen") and "vision_config" in config:
        return "qwen_vl"
    raise ModelLoadError(f"{folder} holds a '{model_type or 'unknown'}' model, which Flywheel has no adapter for",
                         hint="captioner/judge take Qwen2-VL, Qwen2.5-VL or Qwen3-VL folders (`flywheel models list`)")


def tiny_folder(preset: Preset) -> Path:
    """Build (once) and return the tiny model folder for a tiny preset: $FLYWHEEL_CACHE/tiny/<name>-<version>."""
    assert preset.tiny is not None
    root = Path(os.environ.get("FLYWHEEL_CACHE") or "~/.cache/flywheel").expanduser() / "tiny"
    folder = root / f"{preset.name}-{TINY_VERSION}"
    if (folder / ".complete").exists():
        return folder
    module, func, kwargs = preset.tiny
    root.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so a crash or a parallel build never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=root))
    try:
        built = Path(getattr(importlib.import_module(module), func)(tmp / "model", **kwargs))
        (built / ".complete").write_text(TINY_VERSION)
        try:
            built.rename(folder)
        except OSError:  # another process finished first; use its folder
            if not (folder / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny model %s in %s", preset.name, folder)
    return folder


def _settings(resolved: ResolvedModel, family: str, cfg: ModelsConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """Preset defaults < [models] (with the role's [models.overrides]) < explicit keyword overrides."""
    settings: dict[str, Any] = dict(resolved.preset.settings) if resolved.preset else {}
    load = cfg.for_role(ROLE_OF_FAMILY[family])
    settings.update(device=load["device"], quantization=load["quantization"])
    if load["dtype"] != "auto":
        settings["dtype"] = load["dtype"]
    if family == "qwen_vl":
        settings["trust_remote_code"] = cfg.trust_remote_code
        settings["batch_size"] = cfg.vlm_batch_size
        settings["compile"] = cfg.vlm_compile
        if "vlm_max_pixels" in cfg.model_fields_set or "max_pixels" not in settings:
            settings["max_pixels"] = cfg.vlm_max_pixels
        if load["cpu_offload"]:
            log.info("cpu_offload does not apply to the VLM (it is small next to the diffusion models); use "
                     "quantization for it instead")
    else:
        settings["cpu_offload"] = load["cpu_offload"]
    settings.update(overrides)
    return settings


def _device_dtype(resolved: ResolvedModel, settings: dict[str, Any]) -> None:
    """Resolve "auto" once and use the preset's GPU dtype on CUDA (float32 on CPU)."""
    from flywheel.models.hub import check_cpu_can_run, pick_device

    if resolved.preset is None:  # a folder or hub id: full size or not by its parameter count
        check_cpu_can_run(resolved.label, settings.get("device", "auto"), folder=resolved.folder)
    settings["device"] = pick_device(settings.get("device", "auto"))
    if "dtype" not in settings and resolved.preset and settings["device"] == "cuda":
        settings["dtype"] = resolved.preset.dtype


def _qwen_vl(resolved: ResolvedModel, settings: dict[str, Any]):
    from flywheel.models.qwen_vl import QwenVLModel

    _device_dtype(resolved, settings)
    return QwenVLModel.from_pretrained(resolved.folder, model_id=resolved.label, **settings)


def _qwen_image_edit(resolved: ResolvedModel, settings: dict[str, Any]):
    from flywheel.models.qwen_image_edit import QwenImageEditor

    _device_dtype(resolved, settings)
    return QwenImageEditor.from_pretrained(resolved.folder, model_id=resolved.label, **settings)


def _pix2pix(resolved: ResolvedModel, settings: dict[str, Any]):
    from flywheel.models.instruct_pix2pix import InstructPix2PixEditor

    _device_dtype(resolved, settings)
    return InstructPix2PixEditor.from_pretrained(resolved.folder, model_id=resolved.label, **settings)


def _flux(resolved: ResolvedModel, settings: dict[str, Any]):
    from flywheel.models.flux import FluxTextToImage

    _device_dtype(resolved, settings)
    return FluxTextToImage.from_pretrained(str(resolved.folder), **settings)


def _flux_kontext(resolved: ResolvedModel, settings: dict[str, Any]):
    from flywheel.models.flux import FluxKontextEditor

    _device_dtype(resolved, settings)
    return FluxKontextEditor.from_pretrained(str(resolved.folder), **settings)


def _editor(module: str, cls_name: str, **fixed: Any):
    """The loader of an editor adapter class with the common ``from_pretrained(folder, model_id=, ...)``."""

    def load_adapter(resolved: ResolvedModel, settings: dict[str, Any]):
        _device_dtype(resolved, settings)
        cls = getattr(importlib.import_module(module), cls_name)
        return cls.from_pretrained(resolved.folder, model_id=resolved.label, **fixed, **settings)

    return load_adapter


_ADAPTERS = {"qwen_vl": _qwen_vl, "qwen_image_edit": _qwen_image_edit, "instruct_pix2pix": _pix2pix,
             "flux": _flux, "flux_kontext": _flux_kontext,
             "flux2_klein": _editor("flywheel.models.flux2_klein", "Flux2KleinEditor"),
             "flux2_klein_t2i": _editor("flywheel.models.flux2_klein_t2i", "Flux2KleinTextToImage"),
             "longcat_edit": _editor("flywheel.models.longcat_edit", "LongCatEditor"),
             "sdxl_inpaint": _editor("flywheel.models.sdxl_inpaint", "InpaintEditor", family="sdxl_inpaint"),
             "flux_fill": _editor("flywheel.models.sdxl_inpaint", "InpaintEditor", family="flux_fill"),
             "sdxl_controlnet": _editor("flywheel.models.sdxl_controlnet", "SDXLControlNetEditor")}


def model_info(spec: str, models_cfg: ModelsConfig | None = None) -> dict[str, Any]:
    """Load ``spec`` and report what ``flywheel models info`` shows: parameters, dtype, device, VRAM."""
    from flywheel.models.hub import count_parameters, vram_report

    from flywheel.config import ModelsConfig

    cfg = models_cfg or ModelsConfig()
    from flywheel.models.openai_common import is_api_spec

    if is_api_spec(spec):
        raise ConfigError(f"'{spec}' is a service, not a model on this machine: it has no weights or VRAM to report",
                          hint="its endpoint, models and limits are [api] in flywheel.toml (docs/api.md)")
    resolved = resolve(spec, trust_remote_code=cfg.trust_remote_code)
    n_params, n_bytes = count_parameters(resolved.folder)
    adapter = load(spec, cfg)
    info: dict[str, Any] = {"model": resolved.label, "family": resolved.family, "folder": str(resolved.folder),
                            "parameters": n_params, "weights_gib": n_bytes / 1024**3, **adapter.params()}
    report = vram_report()
    info["vram"] = (f"{report.allocated_gib:.2f} GiB allocated, {report.peak_gib:.2f} GiB peak on {report.device}"
                    if report else "n/a (no CUDA GPU)")
    return info
