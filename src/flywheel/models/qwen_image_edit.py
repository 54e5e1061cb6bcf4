"""Qwen-Image-Edit / Qwen-Image-Edit-2511 adapter (ImageEditor), via diffusers.

``Qwen-Image-Edit-2509``/``-2511`` folders are ``QwenImageEditPlusPipeline``: they take several images per
edit, so the character's other source images go in as references (Picture 2, 3, ...) after the image
being edited (Picture 1). The original ``Qwen-Image-Edit`` takes one image; references are then unused.
The Plus pipeline edits one prompt per call, so requests run one at a time, each with its own seed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.models._diffusers_common import generator, load_pipeline, output_size
from flywheel.models.base import EditRequest
from flywheel.models.hub import read_json

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 40, "true_cfg_scale": 4.0, "negative_prompt": " ",
                            "max_area": 1024 * 1024, "max_references": 3}


class QwenImageEditor:
    def __init__(self, pipe, *, model_id: str, device: str, dtype, plus: bool, cpu_offload: bool,
                 quantization: str, settings: dict[str, Any]):
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.plus = plus
        self.cpu_offload = cpu_offload
        self.quantization = quantization
        self.settings = settings

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model_id: str | None = None, device: str = "cpu",
                        dtype: str | None = None, cpu_offload: bool = False, quantization: str = "none",
                        vae_tiling: bool | None = None, **settings: Any) -> QwenImageEditor:
        from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

        folder = Path(path)
        plus = read_json(folder / "model_index.json").get("_class_name") == "QwenImageEditPlusPipeline"
        pipe_cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
        label = model_id or str(folder)
        pipe, torch_dtype = load_pipeline(pipe_cls, folder, label=label, device=device, dtype=dtype,
                                          cpu_offload=cpu_offload, quantization=quantization, vae_tiling=vae_tiling,
                                          quantize=("transformer", "text_encoder"))
        return cls(pipe, model_id=label, device=device, dtype=torch_dtype, plus=plus, cpu_offload=cpu_offload,
                   quantization=quantization, settings={**DEFAULTS, **settings})

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One edited image per request, same order, sized like the source at about ``max_area`` pixels."""
        opts = dict(self.settings)
        max_area, max_refs = opts.pop("max_area"), opts.pop("max_references")
        if opts.get("true_cfg_scale", 1.0) <= 1.0:
            opts.pop("negative_prompt", None)  # without true CFG the negative prompt is unused
        out = []
        for req in requests:
            source = req.image.convert("RGB")
            width, height = output_size(*source.size, max_area)
            images: list[Image.Image] | Image.Image = source
            if self.plus:
                images = [source, *(r.convert("RGB") for r in req.references[:max_refs])]
            elif req.references:
                log.debug("%s takes one image per edit; %d reference(s) unused", self.model_id, len(req.references))
            result = self.pipe(image=images, prompt=req.prompt, width=width, height=height,
                               generator=generator(req.seed, self.device), **opts)
            out.append(result.images[0])
        return out

    def params(self) -> dict[str, Any]:
        return {"model": self.model_id, "family": "qwen_image_edit", "plus": self.plus, "device": self.device,
                "dtype": str(self.dtype), "cpu_offload": self.cpu_offload, "quantization": self.quantization,
                **self.settings}
