"""FLUX.2 [klein] text-to-image with LoRAs (TextToImage protocol): renders klein LoRAs in generate / evaluate.

LoRAs are trained on the undistilled klein base and render on the distilled klein of the same size (4 steps,
no CFG): the same ``Flux2KleinPipeline``, whose diffusers LoRA loader (``Flux2LoraLoaderMixin``) reads both
the diffusers file and the kohya / ComfyUI one. Requests, batching and per-image seeded generators are the
FLUX.1 adapter's (``flywheel.models.flux.FluxTextToImage``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from flywheel.models.flux import FluxTextToImage, _load_pipeline

DEFAULTS: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 1.0, "max_sequence_length": 512}


class Flux2KleinTextToImage(FluxTextToImage):
    lora_hint = ("is it a FLUX.2 klein LoRA (diffusers, kohya or ComfyUI keys) trained on the klein base of this "
                 "size (FLUX.2-klein-base-4B for klein 4B, FLUX.2-klein-base-9B for 9B)?")

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, model_id: str | None = None, dtype=None,
                        device: str | None = None, cpu_offload: bool = False, quantization: str = "none",
                        **defaults: Any) -> Flux2KleinTextToImage:
        from diffusers import Flux2KleinPipeline

        pipe, source, device, dtype = _load_pipeline(Flux2KleinPipeline, path_or_id, dtype=dtype, device=device,
                                                     cpu_offload=cpu_offload, quantization=quantization)
        # The distilled klein presets are editors too: their edit-only settings (max_area, max_references)
        # are not sampler arguments.
        accepted = inspect.signature(Flux2KleinPipeline.__call__).parameters
        defaults = {k: v for k, v in defaults.items() if k in accepted}
        return cls(pipe, model_id or source, device=device, dtype=dtype, cpu_offload=cpu_offload,
                   quantization=quantization, defaults={**DEFAULTS, **defaults})

    def params(self) -> dict[str, Any]:
        return {**super().params(), "family": "flux2_klein", "distilled": bool(self.pipe.config.is_distilled)}
