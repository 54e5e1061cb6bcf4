"""Tiny random-initialised models of the real architectures, saved as real Hugging Face folders.

Every builder takes a folder, writes a complete model there (config, tokenizer/processor with the real
chat template, ``*.safetensors``) with a fixed seed, and returns the folder; the normal loaders in
``flywheel.models`` then load it exactly as they load downloaded weights. Builders import torch,
transformers and diffusers only when called, and are resolved lazily here so this package imports
even while a family's builder module is absent.
"""

from __future__ import annotations

import importlib
from typing import Any

_BUILDERS = {
    "build_tiny_qwen2_vl": "flywheel.testing.tiny.vlm",
    "build_tiny_qwen_image_edit": "flywheel.testing.tiny.qwen_image",
    "build_tiny_pix2pix": "flywheel.testing.tiny.pix2pix",
    "build_tiny_flux": "flywheel.testing.tiny.flux",
    "build_tiny_flux2_klein": "flywheel.testing.tiny.flux2_klein",
    "build_tiny_longcat_edit": "flywheel.testing.tiny.longcat",
    "build_tiny_sdxl_inpaint": "flywheel.testing.tiny.sdxl",
    "build_tiny_sdxl_controlnet": "flywheel.testing.tiny.sdxl",
    "build_tiny_flux_fill": "flywheel.testing.tiny.sdxl",
    "build_tiny_sam": "flywheel.testing.tiny.sam",
    "build_tiny_depth_anything": "flywheel.testing.tiny.depth",
}
__all__ = list(_BUILDERS)


def __getattr__(name: str) -> Any:
    if name in _BUILDERS:
        return getattr(importlib.import_module(_BUILDERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
