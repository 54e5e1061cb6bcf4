"""Inpainting editors (ImageEditor): mask the character, repaint only the rest, paste the character back.

Two pipelines, one adapter: SDXL inpainting (``StableDiffusionXLInpaintPipeline``, family ``sdxl_inpaint``,
diffusers/stable-diffusion-xl-1.0-inpainting-0.1) and FLUX.1 Fill (``FluxFillPipeline``, family ``flux_fill``,
black-forest-labs/FLUX.1-Fill-dev). Each edit: the subject's probability mask (``flywheel.models.subject_mask``:
mediapipe for people, SAM for anything else), feathered; the pipeline repaints where the alpha is below 255;
then the source is composited back over the result, so every pixel of the character (and ``grow`` px
around it) is the source's own byte (identity holds by construction; the judge still checks the edit).

The pipelines are text-to-image models of the background, not instruction followers: the prompt is the
recipe's ``caption`` ("standing in a forest, trees in the background") when it has one, else its prompt. The
mask travels with the output (``image.info["edit_mask"]``) and ``flywheel.enrich`` stores it in the content
store with the image's lineage; its quality report (``image.info["subject_mask"]``) becomes a score row, so a
failed mask (no person found) is rejected by the judge instead of passing as an edit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.models._diffusers_common import generator, output_size
from flywheel.models.base import EditRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec
from flywheel.models.subject_mask import (
    composite_back,
    feathered_alpha,
    mask_report,
    subject_probability,
)

log = logging.getLogger(__name__)

MASK_KEYS = ("segmenter", "sam_model", "grow", "feather")
DEFAULTS: dict[str, dict[str, Any]] = {
    # diffusers' SDXL inpainting card: ~20-30 steps, guidance 8, strength just under 1 (1.0 ignores the
    # masked image's colours entirely, which is what a new background wants).
    "sdxl_inpaint": {"num_inference_steps": 30, "guidance_scale": 8.0, "strength": 0.99, "max_area": 1024 * 1024,
                     "negative_prompt": None},
    # FLUX.1 Fill [dev]'s card: 50 steps, guidance 30.
    "flux_fill": {"num_inference_steps": 50, "guidance_scale": 30.0, "max_area": 1024 * 1024,
                  "max_sequence_length": 512},
}
MASK_DEFAULTS: dict[str, Any] = {"segmenter": "mediapipe", "sam_model": None, "grow": 4, "feather": 8}


def scene_text(recipe, prompt: str) -> str:
    """What a text-to-image pipeline is told for a recipe: the scene it should show (the recipe's caption), not
    an instruction; the prompt when the recipe has no caption."""
    return recipe.caption if recipe is not None and recipe.caption else prompt


def recipe_text(request: EditRequest) -> str:
    return scene_text(request.recipe, request.prompt)


class InpaintEditor(DiffusersEditor):
    family = "sdxl_inpaint"  # or "flux_fill", per instance

    def __init__(self, pipe, *, family: str, mask: dict[str, Any], **common: Any):
        super().__init__(pipe, **common)
        self.family = family
        self.mask = mask

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        import diffusers

        family = settings.pop("family", "sdxl_inpaint")
        flux = family == "flux_fill"
        mask = {k: settings.pop(k, v) for k, v in MASK_DEFAULTS.items()}
        return PipelineSpec(diffusers.FluxFillPipeline if flux else diffusers.StableDiffusionXLInpaintPipeline,
                            DEFAULTS[family], quantize=("transformer",) if flux else ("unet",),
                            state={"family": family, "mask": mask})

    def recipe_prompt(self, recipe) -> str:
        """The prompt the pipeline gets for ``recipe`` (recorded with each edit)."""
        return scene_text(recipe, recipe.full_prompt)

    def subject_alpha(self, image: Image.Image):
        """(uint8 alpha, mask report) for ``image``: 255 where the character's pixels are kept."""
        prob = subject_probability(image, self.mask["segmenter"], sam_model=self.mask["sam_model"],
                                   device=self.device)
        return feathered_alpha(prob, grow=int(self.mask["grow"]), feather=int(self.mask["feather"])), \
            mask_report(prob, self.mask["segmenter"])

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One image per request, the source's size: the background repainted, the character's bytes kept."""
        opts = {k: v for k, v in self.settings.items() if v is not None}
        max_area = opts.pop("max_area")
        multiple = 16 if self.family == "flux_fill" else 8
        out = []
        for req in requests:
            source = req.image.convert("RGB")
            alpha, report = self.subject_alpha(source)
            size = output_size(*source.size, max_area, multiple=multiple)
            repaint = Image.fromarray(255 - alpha).resize(size, Image.Resampling.BILINEAR)  # white = repaint
            result = self.pipe(prompt=recipe_text(req), image=source.resize(size, Image.Resampling.LANCZOS),
                               mask_image=repaint, width=size[0], height=size[1],
                               generator=generator(req.seed, self.device), **opts).images[0]
            image = composite_back(source, result, alpha)
            image.info["edit_mask"] = Image.fromarray(alpha)
            image.info["subject_mask"] = report
            out.append(image)
        return out

    def family_params(self) -> dict[str, Any]:
        return {"mask": dict(self.mask), "prompt_from": "recipe caption"}
