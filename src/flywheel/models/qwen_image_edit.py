"""Qwen-Image-Edit / Qwen-Image-Edit-2511 adapter (ImageEditor), via diffusers.

``Qwen-Image-Edit-2509``/``-2511`` folders are ``QwenImageEditPlusPipeline``: they take several images per
edit, so the character's other source images go in as references after the image being edited. The
pipeline's prompt template labels the images "Picture 1", "Picture 2", ... in the order given, so the
prompt names Picture 1 as the character to keep and the others as references of the same character
(``pipeline_prompt``): without that, the model tends to merge people or copy a reference's pose and
background. The original ``Qwen-Image-Edit`` takes one image; references are then unused.

Editor LoRAs (e.g. the few-step Lightning LoRAs) and a fixed sampling shift come in as the ``loras`` and
``scheduler_shift`` settings (``flywheel.models.editor_options``) and are recorded in ``params()``.
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
from flywheel.models.editor_options import set_scheduler_shift
from flywheel.models.hub import read_json

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 40, "true_cfg_scale": 4.0, "negative_prompt": " ",
                            "max_area": 1024 * 1024, "max_references": 3}
# With references: which picture is edited, whose identity to keep, and what the other pictures are for.
REFERENCE_PROMPT = ("Edit Picture 1: {prompt} Keep the character in Picture 1. {refs} the same character in "
                    "{photos}, only as {references} for the face, hair and outfit: do not add anyone from "
                    "{them} or copy {their} pose or background.")


def pipeline_prompt(prompt: str, n_references: int) -> str:
    """The instruction as the Plus pipeline receives it, for a source plus ``n_references`` references."""
    if n_references <= 0:
        return prompt
    prompt = prompt.strip()
    prompt += "" if prompt.endswith((".", "!", "?")) else "."
    if n_references == 1:
        words = {"refs": "Picture 2 shows", "photos": "another photo", "references": "a reference", "them": "it",
                 "their": "its"}
    else:
        pictures = "Pictures 2 and 3" if n_references == 2 else f"Pictures 2 to {n_references + 1}"
        words = {"refs": f"{pictures} show", "photos": "other photos", "references": "references", "them": "them",
                 "their": "their"}
    return REFERENCE_PROMPT.format(prompt=prompt, **words)


class QwenImageEditor(DiffusersEditor):
    family = "qwen_image_edit"

    def __init__(self, pipe, *, plus: bool, scheduler_shift: float | None = None, **common: Any):
        super().__init__(pipe, **common)
        self.plus = plus
        self.scheduler_shift = scheduler_shift

    @property
    def max_references(self) -> int:
        return int(self.settings["max_references"]) if self.plus else 0

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

        plus = read_json(folder / "model_index.json").get("_class_name") == "QwenImageEditPlusPipeline"
        return PipelineSpec(QwenImageEditPlusPipeline if plus else QwenImageEditPipeline, DEFAULTS,
                            quantize=("transformer", "text_encoder"),
                            state={"plus": plus, "scheduler_shift": settings.pop("scheduler_shift", None)})

    @classmethod
    def loaded(cls, pipe, spec: PipelineSpec) -> None:
        if spec.state["scheduler_shift"]:
            set_scheduler_shift(pipe, spec.state["scheduler_shift"])

    def pipeline_prompt(self, prompt: str, n_references: int) -> str:
        """What the pipeline is given for ``prompt`` with ``n_references`` references (recorded by enrich)."""
        return pipeline_prompt(prompt, min(n_references, self.max_references))

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One edited image per request, same order, sized like the source at about ``max_area`` pixels."""
        opts = dict(self.settings)
        max_area = opts.pop("max_area")
        opts.pop("max_references")
        if opts.get("true_cfg_scale", 1.0) <= 1.0:
            opts.pop("negative_prompt", None)  # without true CFG the negative prompt is unused
        sized = [(r.image.convert("RGB"), output_size(*r.image.size, max_area)) for r in requests]
        if self.plus:
            return [self._edit_plus(req, image, size, opts) for req, (image, size) in zip(requests, sized)]
        if any(r.references for r in requests):
            log.debug("%s takes one image per edit; reference images are unused", self.model_id)
        return self._edit_batched(requests, sized, opts)

    def _edit_plus(self, req: EditRequest, source: Image.Image, size: tuple[int, int], opts: dict[str, Any]):
        # One call per edit: QwenImageEditPlusPipeline (diffusers 0.42) raises for more than one prompt per
        # call ("currently only supports batch_size=1"), so Plus editors are not batched.
        refs = [r.convert("RGB") for r in req.references[:self.max_references]]
        result = self.pipe(image=[source, *refs], prompt=pipeline_prompt(req.prompt, len(refs)), width=size[0],
                           height=size[1], generator=generator(req.seed, self.device), **opts)
        return result.images[0]

    def _edit_batched(self, requests: list[EditRequest], sized, opts: dict[str, Any]) -> list[Image.Image]:
        """The one-image pipeline takes lists of images and prompts: requests of one output size run as one
        call, each with its own seeded generator (so a result depends on its seed, not on its batch)."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (_, size) in enumerate(sized):
            groups[size].append(i)
        out: list[Image.Image | None] = [None] * len(requests)
        for (width, height), idx in groups.items():
            call = dict(opts)
            if "negative_prompt" in call:  # one per prompt, or the negative branch has the wrong batch size
                call["negative_prompt"] = [call["negative_prompt"]] * len(idx)
            images = self.pipe(image=[sized[i][0] for i in idx], prompt=[requests[i].prompt for i in idx],
                               width=width, height=height,
                               generator=[generator(requests[i].seed, self.device) for i in idx], **call).images
            for i, im in zip(idx, images):
                out[i] = im
        return out  # type: ignore[return-value]

    def family_params(self) -> dict[str, Any]:
        return {"plus": self.plus, "scheduler_shift": self.scheduler_shift}
