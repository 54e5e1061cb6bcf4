"""Describe-then-generate (route A of the plan): the VLM describes the character, a text-to-image model renders it.

``describe_character`` asks the captioner for a detailed, identity-focused description of the character seen
in the sources (face, hair, body, outfit, colours, marks; never the background, pose or light, which the
recipes change). ``DescribeGenerateEditor`` is an ImageEditor over any TextToImage adapter (the FLUX base,
or another generator): each edit renders the description followed by the recipe's scene, at the source's
aspect ratio and, mixed into the seed, a render of its own. Nothing of the source's pixels reaches the output, so identity rests on the text alone: a cold
start for characters the editors handle badly, and the judge decides whether it held.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from PIL import Image

from flywheel.models.base import (
    ChatRequest,
    EditRequest,
    TextToImage,
    TextToImageRequest,
    VisionLanguageModel,
)

log = logging.getLogger(__name__)

DESCRIBE_PROMPT = (
    "These images show one character. Describe the character so that an artist who never saw these images "
    "could draw exactly the same character again: face shape, eyes, nose, mouth, skin tone, hair (colour, "
    "length, style), build and age, outfit (every garment, its colours and materials), accessories and "
    "distinctive marks. Describe only what stays the same in every image; leave out the background, pose, "
    "expression, camera angle and lighting. Answer with one paragraph of plain sentences, no lists."
)


def describe_character(vlm: VisionLanguageModel, images: list[Image.Image], *, max_new_tokens: int = 300,
                       seed: int = 0) -> str:
    """The VLM's description of the character in ``images`` (whitespace normalised)."""
    (text,) = vlm.generate([ChatRequest(text=DESCRIBE_PROMPT, images=images)], max_new_tokens=max_new_tokens,
                           seed=seed)
    return " ".join(text.split())


def description_sha(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def render_seed(request: EditRequest) -> int:
    """The generator's seed: the edit's seed mixed with the source's pixels, so each source gets its own render
    of the same text (the prompt does not depend on the source) and a seed still gives the same image."""
    pixels = hashlib.sha256(request.image.convert("RGB").tobytes()).digest()
    return (request.seed * 1_000_003 + int.from_bytes(pixels[:4], "big")) % 2**31


class DescribeGenerateEditor:
    """Renders ``description`` + the recipe's scene with ``generator`` (the source only gives the aspect ratio)."""

    def __init__(self, generator: TextToImage, description: str, *, max_area: int = 1024 * 1024):
        self.generator = generator
        self.description = " ".join(description.split())
        self.max_area = max_area
        self.model_id = f"describe-generate:{generator.model_id}"

    def generation_prompt(self, request: EditRequest) -> str:
        """The recipe's scene as a sentence, then the description: first, because CLIP reads 77 tokens and
        a long description would cut the scene off."""
        from flywheel.models.sdxl_inpaint import recipe_text

        scene = recipe_text(request).strip().rstrip(".")
        return f"{scene[0].upper() + scene[1:]}. {self.description}" if scene else self.description

    def recipe_prompt(self, recipe) -> str:
        """The prompt the generator gets for ``recipe`` (recorded with each edit)."""
        return self.generation_prompt(EditRequest(image=None, prompt=recipe.full_prompt, seed=0,  # type: ignore[arg-type]
                                                  recipe=recipe))

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        from flywheel.models._diffusers_common import output_size

        out = []
        for req in requests:
            width, height = output_size(*req.image.size, self.max_area, multiple=16)
            (image,) = self.generator.generate([TextToImageRequest(self.generation_prompt(req), render_seed(req),
                                                                   width, height)])
            out.append(image)
        return out

    def params(self) -> dict[str, Any]:
        return {"model": self.model_id, "family": "describe_generate", "max_area": self.max_area,
                "description": self.description, "description_sha256": description_sha(self.description),
                "generator": self.generator.params()}
