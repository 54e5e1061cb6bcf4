"""InstructPix2Pix adapter (ImageEditor): a small Stable Diffusion 1.5 editor, the cheap GPU fallback.

It edits one image with text; reference images are not used. Requests of one output size run as a batch,
each with its own seeded generator, so a result depends on its seed and not on its batch. Stable Diffusion
1.5 LoRAs load as editor LoRAs (``loras``, ``flywheel.models.editor_options``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.models._diffusers_common import generator, output_size
from flywheel.models.base import EditRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 7.5, "image_guidance_scale": 1.5,
                            "max_area": 512 * 512, "batch_size": 4}


class InstructPix2PixEditor(DiffusersEditor):
    family = "instruct_pix2pix"

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        return PipelineSpec(StableDiffusionInstructPix2PixPipeline, DEFAULTS, quantize=("unet",),
                            load_kwargs={"safety_checker": None, "requires_safety_checker": False})

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        opts = dict(self.settings)
        max_area, batch_size = opts.pop("max_area"), opts.pop("batch_size")
        if any(r.references for r in requests):
            log.debug("InstructPix2Pix takes one image per edit; reference images are unused")
        # The output has the input's size, so resize first; same-size requests share a batch.
        sized = [r.image.convert("RGB").resize(output_size(*r.image.size, max_area, multiple=8)) for r in requests]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(sized):
            groups[im.size].append(i)
        out: list[Image.Image | None] = [None] * len(requests)
        for idx in groups.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                images = self.pipe(prompt=[requests[i].prompt for i in chunk], image=[sized[i] for i in chunk],
                                   generator=[generator(requests[i].seed, self.device) for i in chunk], **opts).images
                for i, im in zip(chunk, images):
                    out[i] = im
        return out  # type: ignore[return-value]
