"""``[enrich]``'s editor settings: which adapter setting each key overrides, and how they enter work keys.

Unset keys keep the ``[models] editor`` preset's values (``flywheel.models.presets``); a key the backend's
pipeline does not read is an error. The settings that differ from the preset's are hashed into the editor
part of enrich's work keys, so other steps, guidance or LoRAs mean other edits (``flywheel.enrich``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flywheel.config import EnrichConfig
from flywheel.errors import ConfigError

_INPAINT = frozenset({"inpaint-sdxl", "inpaint-flux-fill"})
_SDXL = frozenset({"inpaint-sdxl", "sdxl-turbo-controlnet"})
_GENERATIVE = frozenset({"qwen-image-edit", "flux-kontext", "flux2-klein", "longcat-image-edit", "instruct-pix2pix",
                         *_INPAINT, *_SDXL})
# [enrich] editor keys: the adapter setting each one overrides, and the backends whose pipelines read it.
# LongCat-Image-Edit samples at ~1024² whatever it is given and has no LoRA loader; the klein pipelines have no
# negative prompt and set their own shift.
EDITOR_KEYS: dict[str, tuple[str, frozenset[str]]] = {
    "steps": ("num_inference_steps", _GENERATIVE),
    "guidance": ("guidance_scale", frozenset({"flux-kontext", "flux2-klein", "longcat-image-edit", "instruct-pix2pix",
                                              *_INPAINT, *_SDXL})),
    "true_cfg": ("true_cfg_scale", frozenset({"qwen-image-edit", "flux-kontext"})),
    "negative_prompt": ("negative_prompt", _GENERATIVE - {"flux2-klein", "inpaint-flux-fill"}),
    "max_area": ("max_area", _GENERATIVE - {"longcat-image-edit"}),
    "scheduler_shift": ("scheduler_shift", frozenset({"qwen-image-edit", "flux-kontext"})),
    "loras": ("loras", _GENERATIVE - {"longcat-image-edit"}),
    # Qwen-Image-Edit-Plus resizes every reference to ~1024² itself (diffusers' VAE_IMAGE_SIZE): only klein's
    # reference tokens follow the size it is given.
    "reference_area": ("reference_area", frozenset({"flux2-klein"})),
    # DiffusersEditor families (flywheel.models.editor_speed); the inpainting / ControlNet routes are not tuned.
    "speed": ("speed", frozenset({"qwen-image-edit", "flux-kontext", "flux2-klein", "longcat-image-edit",
                                  "instruct-pix2pix"})),
}


# [enrich.inpaint] / [enrich.controlnet] keys: the adapter setting each one sets, for the backends that read it
# (they apply wherever the backend runs: as [enrich] backend or as a route of [enrich.routes]).
TABLE_KEYS: dict[str, dict[str, tuple[str, frozenset[str]]]] = {
    "inpaint": {"segmenter": ("segmenter", _INPAINT), "sam_model": ("sam_model", _INPAINT),
                "grow": ("grow", _INPAINT), "feather": ("feather", _INPAINT),
                "strength": ("strength", frozenset({"inpaint-sdxl"}))},
    "controlnet": {k: (k, frozenset({"sdxl-turbo-controlnet"})) for k in ("mode", "control", "depth_model", "strength")}
    | {"conditioning_scale": ("controlnet_conditioning_scale", frozenset({"sdxl-turbo-controlnet"}))},
}


def table_settings(cfg: EnrichConfig) -> dict[str, Any]:
    """What [enrich.inpaint] / [enrich.controlnet] set for ``cfg.backend`` (tables of other backends are ignored:
    they belong to routes of [enrich.routes])."""
    settings: dict[str, Any] = {}
    for table, keys in TABLE_KEYS.items():
        for key, (setting, backends) in keys.items():
            value = getattr(getattr(cfg, table), key)
            if value is not None and cfg.backend in backends:
                settings[setting] = value
    return settings


def editor_settings(cfg: EnrichConfig, base: Path | None = None) -> dict[str, Any]:
    """The editor settings [enrich] sets (unset keys keep the preset's), named as the adapters take them.

    A key the backend's pipeline does not read is an error rather than silently ignored. LoRA paths are
    resolved against ``base`` (the project folder) when given.
    """
    if cfg.backend in ("composite", "describe-generate"):
        return {}
    settings: dict[str, Any] = table_settings(cfg)
    for key, (setting, backends) in EDITOR_KEYS.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        if cfg.backend not in backends:
            hint = ("Qwen-Image-Edit has no distilled guidance input: use true_cfg" if key == "guidance" else
                    "Qwen-Image-Edit resizes references to ~1024² itself, whatever size they come in; remove it"
                    if key == "reference_area" and cfg.backend == "qwen-image-edit" else
                    f"it is read by {', '.join(sorted(backends))}; remove it for backend '{cfg.backend}'")
            raise ConfigError(f"[enrich] {key} does not apply to backend '{cfg.backend}'", hint=hint)
        if key == "loras":
            value = [_lora_spec(lora.model_dump(exclude_none=True), base) for lora in value]
        settings[setting] = value
    return settings


def _lora_spec(spec: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """One editor LoRA as adapters take it: hub + weight, or path (absolute when ``base`` is given); scale."""
    out = {k: spec[k] for k in ("hub", "weight") if spec.get(k)}
    if spec.get("path"):
        path = Path(spec["path"]).expanduser()
        out["path"] = str(path if base is None or path.is_absolute() else base / path)
    out["scale"] = float(spec.get("scale", 1.0))
    return out


def settings_tag(cfg: EnrichConfig, spec: str) -> str:
    """'' when [enrich] changes nothing the preset of ``spec`` sets, else '+' and a hash of what it changes
    (LoRA paths as written in flywheel.toml, so moving the project folder keeps its keys)."""
    from flywheel.models.presets import get_preset

    preset = get_preset(spec, role="editor")
    preset_settings = preset.settings if preset else {}

    def norm(key: str, value: Any) -> Any:
        if key == "speed" and value == "none":  # what no speed setting does: the same edits
            return None
        return [_lora_spec(v, None) for v in value] if isinstance(value, list) else value

    changed = {k: norm(k, v) for k, v in editor_settings(cfg).items()
               if norm(k, v) != norm(k, preset_settings.get(k))}
    if not changed:
        return ""
    return "+" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
