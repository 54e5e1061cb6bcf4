"""The small contracts every model adapter implements; stages depend on these, never on a family.

One adapter per model family (``flywheel.models.qwen_vl``, ``flux``, ``qwen_image_edit``, ...), each with a
few methods. A stage asks ``flywheel.models.load_*`` for an adapter built from a preset or a path and
only calls the methods below, so swapping Qwen2-VL for Qwen2.5-VL, or Kontext for Qwen-Image-Edit, is
a config change. ``params()`` returns the resolved settings that are recorded with every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image

if TYPE_CHECKING:
    from flywheel.recipes import Recipe


@dataclass
class ChatRequest:
    """One VLM prompt: images first (in order), then the text; ``system`` replaces the default system prompt."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    system: str | None = None


@runtime_checkable
class VisionLanguageModel(Protocol):
    """Captioner and judge (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, or a scripted stand-in in tests)."""

    model_id: str

    def generate(self, requests: list[ChatRequest], *, max_new_tokens: int = 128, seed: int | None = None) -> list[str]:
        """Batched chat generation (greedy unless the adapter was configured to sample)."""
        ...

    def option_probabilities(self, requests: list[ChatRequest], options: list[str]) -> list[dict[str, float]]:
        """For each request, P(first answer token = option) renormalised over ``options`` (e.g. yes/no)."""
        ...

    def params(self) -> dict[str, Any]: ...


@dataclass
class EditRequest:
    """Edit ``image`` following ``prompt``; ``references`` are extra images of the same character.

    ``recipe`` is the recipe the prompt came from (``flywheel.recipes``), when there is one: generative
    editors follow ``prompt`` and may ignore it; the composite editor, which cannot read prompts, uses
    its ``composite`` spec.
    """

    image: Image.Image
    prompt: str
    seed: int
    references: list[Image.Image] = field(default_factory=list)
    recipe: Recipe | None = None


@runtime_checkable
class ImageEditor(Protocol):
    """Qwen-Image-Edit(-Plus), FLUX.1 Kontext, InstructPix2Pix, or the CPU composite editor."""

    model_id: str

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One output per request, same order; deterministic for a given seed."""
        ...

    def params(self) -> dict[str, Any]: ...


@dataclass
class TextToImageRequest:
    prompt: str
    seed: int
    width: int = 1024
    height: int = 1024


@runtime_checkable
class TextToImage(Protocol):
    """FLUX.1-dev / schnell with optional LoRA weights (synthetic generation, training samples)."""

    model_id: str

    def generate(self, requests: list[TextToImageRequest]) -> list[Image.Image]: ...

    def load_lora(self, path: str, *, name: str, scale: float = 1.0) -> None: ...

    def unload_lora(self) -> None: ...

    def params(self) -> dict[str, Any]: ...
