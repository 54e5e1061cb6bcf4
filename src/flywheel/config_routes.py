"""``[enrich.routes]``, ``[enrich.inpaint]``, ``[enrich.controlnet]`` and ``[enrich.describe]``: which editor makes
each recipe axis, and the settings of the editors that are not instruction followers (docs/enrich.md).

A route is a backend name (``"inpaint-sdxl"``: its default preset, or [models] editor when that is a model of
the backend's family) or ``"backend=model"`` (a preset name, folder or hub id). Unset axes use ``[enrich]
backend``. Unset settings keep the preset's values; set ones are part of the edits' work keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from flywheel.config_base import Section

ROUTE_BACKENDS = ("qwen-image-edit", "flux-kontext", "flux2-klein", "longcat-image-edit", "instruct-pix2pix", "api",
                  "inpaint-sdxl", "inpaint-flux-fill", "sdxl-turbo-controlnet", "describe-generate", "composite")


class EnrichRoutes(Section):
    """``[enrich.routes]``: the backend per recipe axis, e.g. ``background = "inpaint-sdxl"``."""

    background: str | None = None
    lighting: str | None = None
    style: str | None = None
    camera: str | None = None

    @field_validator("background", "lighting", "style", "camera")
    @classmethod
    def _known_backend(cls, v: str | None) -> str | None:
        if v is None:
            return v
        backend, _, model = v.partition("=")
        if backend.strip() not in ROUTE_BACKENDS:
            raise ValueError(f"unknown backend {backend.strip()!r}; use one of {', '.join(ROUTE_BACKENDS)}, "
                             "optionally as 'backend=model'")
        if "=" in v and not model.strip():
            raise ValueError("'backend=' needs a model after '=' (a preset name, folder or hub id)")
        if backend.strip() == "composite" and model.strip():
            raise ValueError("the composite editor has no model")
        return f"{backend.strip()}={model.strip()}" if model.strip() else backend.strip()


class InpaintSettings(Section):
    """``[enrich.inpaint]``: the character's mask for the inpainting backends (inpaint-sdxl, inpaint-flux-fill)."""

    segmenter: Literal["mediapipe", "sam"] | None = Field(
        None, description="'mediapipe': people (CPU); 'sam': anything, Segment Anything (sam_model) prompted at the "
        "image centre (a GPU makes it fast).")
    sam_model: str | None = Field(None, description="SAM hub id or folder, e.g. 'facebook/sam-vit-base'.")
    grow: int | None = Field(None, ge=0, le=64, description="Kept margin around the character, px (default 4).")
    feather: int | None = Field(None, ge=0, le=128, description="Width of the blended edge beyond it, px (default 8).")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="SDXL inpainting: how far the masked area "
                                   "moves from the source (default 0.99).")


class ControlNetSettings(Section):
    """``[enrich.controlnet]``: the SDXL-Turbo + ControlNet backend (sdxl-turbo-controlnet)."""

    mode: Literal["img2img", "txt2img"] | None = Field(
        None, description="img2img (default): start from the source at strength; txt2img: from noise.")
    control: Literal["canny", "depth"] | None = Field(None, description="Structure kept: canny edges or depth.")
    depth_model: str | None = Field(
        None, description="Depth model (hub id or folder) for control = 'depth', e.g. "
        "'depth-anything/Depth-Anything-V2-Small-hf'.")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="img2img strength; steps x strength >= 1.")
    conditioning_scale: float | None = Field(None, ge=0.0, le=2.0, description="ControlNet weight (default 0.6).")


class DescribeSettings(Section):
    """``[enrich.describe]``: describe-then-generate writes the character's description once, then renders it."""

    file: Path = Field(Path("character.txt"), description="The description, relative to the project folder: "
                       "written by the captioner when missing; edit it and the next enrich renders your text.")
    sources: int = Field(4, ge=1, le=8, description="Sources the captioner looks at to describe the character.")
    max_new_tokens: int = Field(300, ge=32, le=2000)
    max_area: int | None = Field(None, ge=64 * 64, le=4096 * 4096,
                                 description="Render size in pixels, in the source's aspect ratio (default 1024²).")
