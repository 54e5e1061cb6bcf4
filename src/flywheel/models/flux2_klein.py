"""FLUX.2 [klein] editor adapter (ImageEditor), via diffusers' ``Flux2KleinPipeline`` / ``Flux2KleinKVPipeline``.

klein edits by conditioning on reference images: the image being edited goes in first and the character's
other sources after it, each as its own set of latent tokens (``image=[source, *references]``). The
distilled klein models (4B, Apache-2.0; 9B, non-commercial) sample in 4 steps without guidance; the
"base" models (the ones to train LoRAs on) take 50 steps with CFG (``guidance_scale`` > 1).
A folder saved as ``Flux2KleinKVPipeline`` (``FLUX.2-klein-9b-kv``, trained for it) loads as that class:
the references' attention keys/values are computed once on the first step and reused, which the
diffusers docs put at 1.4x faster with one reference and up to 2.7x with four. The plain klein weights
were not trained for a cache (their reference tokens change with the timestep), so they keep the
stock pipeline.

The pipeline takes one set of images per call, shared by every prompt in it, so edits run one per call.
``reference_area`` (pixels, default: ``max_area``) sizes the references apart from the edited image: the
transformer attends over every reference's latent tokens on every step (4096 per 1024² image), so two
references at 512² (1024 tokens each) cut the sequence from 16k to 6k tokens. Resized references are
kept per image (enrich hands the same source images over and over), so each is resized once per size.
Editor LoRAs come in as ``loras`` like the other editors' (``flywheel.models.editor_options``). There is no
``scheduler_shift``: the klein pipelines compute their own shift from the image size and the step count.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.models._diffusers_common import generator, output_size
from flywheel.models.base import EditRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec
from flywheel.models.hub import read_json

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 1.0, "max_area": 1024 * 1024,
                            "max_references": 3, "reference_area": None}
MIN_SIDE = 64  # Flux2ImageProcessor rejects smaller condition images
# With references: klein numbers its condition images in the order given (image 1 = the one edited).
REFERENCE_PROMPT = ("{prompt} Keep the person from image 1 and edit image 1. {refs} the same person, only as "
                    "{references} for the face, hair and outfit: do not copy {their} pose or background.")


def pipeline_prompt(prompt: str, n_references: int) -> str:
    """The instruction as klein receives it for a source plus ``n_references`` references."""
    if n_references <= 0:
        return prompt
    prompt = prompt.strip()
    prompt += "" if prompt.endswith((".", "!", "?")) else "."
    if n_references == 1:
        words = {"refs": "Image 2 shows", "references": "a reference", "their": "its"}
    else:
        images = "Images 2 and 3" if n_references == 2 else f"Images 2 to {n_references + 1}"
        words = {"refs": f"{images} show", "references": "references", "their": "their"}
    return REFERENCE_PROMPT.format(prompt=prompt, **words)


def _sized(image: Image.Image, max_area: int) -> Image.Image:
    """RGB at about ``max_area`` pixels (sides multiples of 16, at least 64): what klein encodes anyway."""
    width, height = output_size(*image.size, max_area, multiple=16)
    if min(width, height) < MIN_SIDE:  # a small max_area or a thin image: scale up, keeping the aspect ratio
        grow = (MIN_SIDE / min(width, height)) ** 2
        width, height = output_size(*image.size, int(max_area * grow) + 1, multiple=16)
        width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


class Flux2KleinEditor(DiffusersEditor):
    family = "flux2_klein"

    def __init__(self, pipe, *, kv_cache: bool, distilled: bool, **common: Any):
        super().__init__(pipe, **common)
        self.kv_cache = kv_cache
        self.distilled = distilled
        self._resized: dict[tuple[int, int], tuple[weakref.ref, Image.Image]] = {}

    def _sized_once(self, image: Image.Image, area: int) -> Image.Image:
        """``_sized(image, area)``, kept while ``image`` lives (checked through a weak reference, so a new
        image that reuses a freed one's id is resized anew)."""
        key = (id(image), area)
        hit = self._resized.get(key)
        if hit is not None and hit[0]() is image:
            return hit[1]
        if len(self._resized) > 64:  # drop entries whose image is gone
            self._resized = {k: v for k, v in self._resized.items() if v[0]() is not None}
        out = _sized(image, area)
        self._resized[key] = (weakref.ref(image), out)
        return out

    @property
    def max_references(self) -> int:
        return int(self.settings["max_references"])

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

        index = read_json(folder / "model_index.json")
        kv = index.get("_class_name") == "Flux2KleinKVPipeline"
        return PipelineSpec(Flux2KleinKVPipeline if kv else Flux2KleinPipeline, DEFAULTS,
                            quantize=("transformer", "text_encoder"),
                            state={"kv_cache": kv, "distilled": bool(index.get("is_distilled", kv))})

    def pipeline_prompt(self, prompt: str, n_references: int) -> str:
        """What the pipeline is given for ``prompt`` with ``n_references`` references (recorded by enrich)."""
        return pipeline_prompt(prompt, min(n_references, self.max_references))

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One edited image per request, same order, sized like the source at about ``max_area`` pixels."""
        opts = dict(self.settings)
        max_area = opts.pop("max_area")
        ref_area = opts.pop("reference_area", None) or max_area
        opts.pop("max_references")
        if self.kv_cache:  # the KV pipeline is distilled only: it has no guidance input
            opts.pop("guidance_scale", None)
        out = []
        for req in requests:
            source = self._sized_once(req.image, max_area)
            refs = [self._sized_once(r, ref_area) for r in req.references[:self.max_references]]
            result = self.pipe(image=[source, *refs], prompt=pipeline_prompt(req.prompt, len(refs)),
                               width=source.width, height=source.height, generator=generator(req.seed, self.device),
                               **opts)
            out.append(result.images[0])
        return out

    def family_params(self) -> dict[str, Any]:
        return {"kv_cache": self.kv_cache, "distilled": self.distilled}
