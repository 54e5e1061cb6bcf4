"""LongCat-Image-Edit adapter (ImageEditor), via diffusers' ``LongCatImageEditPipeline``.

LongCat-Image-Edit (6B, Apache-2.0) edits one image per call: its Qwen2.5-VL text encoder reads the
instruction together with the image, so there are no reference images. The stock model samples 50 steps
with CFG 4.5 and a negative prompt; ``LongCat-Image-Edit-Turbo`` is its distilled version (8 steps, CFG
off). The pipeline always samples at about 1024² pixels in the source's aspect ratio (it takes no size),
so there is no ``max_area``; and it has no LoRA loader, so there are no editor LoRAs. A setting it cannot
honour is an error rather than silently dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.errors import ConfigError
from flywheel.models._diffusers_common import generator
from flywheel.models.base import EditRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 50, "guidance_scale": 4.5, "negative_prompt": ""}
_UNSUPPORTED = {"loras": "LongCatImageEditPipeline has no LoRA loader", "max_area": "the pipeline always samples "
                "at about 1024² pixels", "scheduler_shift": "the pipeline sets its own shift",
                "true_cfg_scale": "its CFG scale is guidance_scale ([enrich] guidance)"}


class LongCatEditor(DiffusersEditor):
    family = "longcat_edit"
    takes_loras = False
    max_references = 0  # one image per edit

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        from diffusers import LongCatImageEditPipeline

        for key, why in _UNSUPPORTED.items():
            if settings.get(key):  # an empty LoRA list or None is nothing to honour
                raise ConfigError(f"{label}: LongCat-Image-Edit does not take {key} ({why})",
                                  hint=f"remove {key} from [enrich] (or the preset) for this editor")
            settings.pop(key, None)
        return PipelineSpec(LongCatImageEditPipeline, DEFAULTS, quantize=("transformer", "text_encoder"))

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One edited image per request, same order (one call each: the pipeline takes one source image)."""
        opts = dict(self.settings)
        if opts.get("guidance_scale", 1.0) <= 1.0:
            opts.pop("negative_prompt", None)  # without CFG the negative prompt is unused
        if any(r.references for r in requests):
            log.debug("%s takes one image per edit; reference images are unused", self.model_id)
        return [self.pipe(image=r.image.convert("RGB"), prompt=r.prompt, generator=generator(r.seed, self.device),
                          **opts).images[0] for r in requests]
