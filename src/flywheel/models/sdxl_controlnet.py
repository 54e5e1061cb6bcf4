"""SDXL-Turbo + ControlNet (ImageEditor): the source's structure, the recipe's style, light and background.

The source gives a control image (Canny edges through OpenCV, or a depth map from a depth-estimation model
when ``depth_model`` is set), which holds pose and layout while SDXL-Turbo renders the recipe in 1-4 steps
with no classifier-free guidance (``guidance_scale`` 0, as the turbo distillation expects). ``mode``:
``img2img`` (default) starts from the source at ``strength`` (its colours and the face's tones carry over;
SDXL-Turbo needs ``steps * strength >= 1``), ``txt2img`` from noise (more change, less of the character).

Folders: a base SDXL(-Turbo) repo plus ``controlnet`` (a hub id or folder of a ``ControlNetModel``, e.g.
diffusers/controlnet-canny-sdxl-1.0), or one folder whose model_index.json is a
``StableDiffusionXLControlNetPipeline`` (what the tiny preset builds). Like the inpainting editors it is a
text-to-image model, so it is given the recipe's caption when the recipe has one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from flywheel.errors import ConfigError
from flywheel.models._diffusers_common import generator, output_size
from flywheel.models.base import EditRequest
from flywheel.models.diffusers_editor import DiffusersEditor, PipelineSpec
from flywheel.models.hub import read_json
from flywheel.models.pool import helper_model
from flywheel.models.sdxl_inpaint import recipe_text, scene_text

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {"num_inference_steps": 4, "guidance_scale": 0.0, "strength": 0.5,
                            "controlnet_conditioning_scale": 0.6, "max_area": 1024 * 1024, "negative_prompt": None}
CONTROL_DEFAULTS: dict[str, Any] = {"mode": "img2img", "control": "canny", "canny_low": 100, "canny_high": 200,
                                    "depth_model": None}


def canny_image(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV Canny edges as the 3-channel white-on-black image the Canny ControlNets were trained on."""
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


@helper_model
def _depth_model(spec: str, device: str):
    """The depth model, loaded once per process rather than once per edit; the model pool's release clears it
    (``flywheel.models.pool.free_accelerator_memory``)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES,
    )

    from flywheel.errors import ModelLoadError, ModelNotFoundError
    from flywheel.models.hub import looks_like_path, resolve_model

    hint = ('set [enrich.controlnet] depth_model to a depth-estimation model (hub id or folder), '
            'e.g. "depth-anything/Depth-Anything-V2-Small-hf"')
    if looks_like_path(spec) and not Path(spec).expanduser().is_dir():
        raise ModelNotFoundError(f"depth_model {spec!r}: folder does not exist", hint=hint)
    folder = resolve_model(spec)
    # Checked before loading: transformers would otherwise load a wrong folder's config and fail deep inside
    # with a multi-line "Unrecognized configuration class" listing every depth architecture.
    kind = read_json(folder / "config.json").get("model_type") if (folder / "config.json").exists() else None
    if kind not in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES:
        raise ModelLoadError(f"depth_model {spec!r} is not a depth-estimation model (model_type {kind!r})", hint=hint)
    return (AutoImageProcessor.from_pretrained(folder),
            AutoModelForDepthEstimation.from_pretrained(folder, use_safetensors=True).to(device).eval())


def depth_image(image: Image.Image, spec: str, device: str) -> Image.Image:
    """A depth map (near = bright, 0-255, 3 channels) from a transformers depth-estimation model."""
    import numpy as np
    import torch

    processor, model = _depth_model(spec, device)
    with torch.no_grad():
        depth = model(**processor(images=image.convert("RGB"), return_tensors="pt").to(device)).predicted_depth
    depth = torch.nn.functional.interpolate(depth[:, None].float(), size=image.size[::-1], mode="bicubic")[0, 0]
    d = depth.cpu().numpy()
    # Relative depth has no unit: stretch whatever range the model gives to 0-255 (an absolute floor on the range
    # flattened small-valued maps to a few grey levels); only a flat map stays black.
    span = float(d.max() - d.min())
    d = (d - d.min()) / span if span > 0 else np.zeros_like(d)
    return Image.fromarray(np.stack([(d * 255).astype(np.uint8)] * 3, axis=-1))


class SDXLControlNetEditor(DiffusersEditor):
    family = "sdxl_controlnet"

    def __init__(self, pipe, *, control: dict[str, Any], controlnet: str | None, **common: Any):
        super().__init__(pipe, **common)
        self.control = control
        self.controlnet = controlnet

    @classmethod
    def pipeline(cls, folder: Path, label: str, settings: dict[str, Any], *, device: str,
                 dtype: str | None) -> PipelineSpec:
        import torch
        from diffusers import (
            ControlNetModel,
            StableDiffusionXLControlNetImg2ImgPipeline,
            StableDiffusionXLControlNetPipeline,
        )

        from flywheel.models.hub import resolve_model

        controlnet = settings.pop("controlnet", None)
        control = {k: settings.pop(k, v) for k, v in CONTROL_DEFAULTS.items()}
        if control["mode"] not in ("img2img", "txt2img") or control["control"] not in ("canny", "depth"):
            raise ConfigError(f"{label}: mode {control['mode']!r} / control {control['control']!r}",
                              hint="mode is 'img2img' or 'txt2img'; control is 'canny' or 'depth'")
        if control["control"] == "depth" and not control["depth_model"]:
            raise ConfigError(f"{label}: control = 'depth' needs a depth model",
                              hint='set depth_model, e.g. "depth-anything/Depth-Anything-V2-Small-hf"')
        has_controlnet = "controlnet" in read_json(folder / "model_index.json")
        kwargs: dict[str, Any] = {}
        if not has_controlnet:
            if not controlnet:
                raise ConfigError(f"{label} has no ControlNet", hint="set controlnet to a ControlNet hub id or folder "
                                  "(e.g. diffusers/controlnet-canny-sdxl-1.0)")
            torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
            kwargs["controlnet"] = ControlNetModel.from_pretrained(resolve_model(controlnet), dtype=torch_dtype,
                                                                   use_safetensors=True)
        # The img2img class loads from the same folder (same components). Not ``from_pipe`` on a loaded text-to-
        # image pipeline: it casts every component to float32 unless told a dtype (the H200 benchmark ran the
        # whole route in fp32, 29.3 GiB), and a cast would also undo an fp8-stored UNet.
        pipe_cls = StableDiffusionXLControlNetImg2ImgPipeline if control["mode"] == "img2img" else \
            StableDiffusionXLControlNetPipeline
        return PipelineSpec(pipe_cls, DEFAULTS, quantize=("unet",), load_kwargs=kwargs,
                            state={"control": control, "controlnet": None if has_controlnet else controlnet})

    def recipe_prompt(self, recipe) -> str:
        """The prompt the pipeline gets for ``recipe`` (recorded with each edit)."""
        return scene_text(recipe, recipe.full_prompt)

    def control_image(self, image: Image.Image) -> Image.Image:
        if self.control["control"] == "depth":
            return depth_image(image, self.control["depth_model"], self.device)
        return canny_image(image, int(self.control["canny_low"]), int(self.control["canny_high"]))

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        """One image per request at about ``max_area`` pixels in the source's aspect ratio."""
        opts = {k: v for k, v in self.settings.items() if v is not None}
        max_area = opts.pop("max_area")
        img2img = self.control["mode"] == "img2img"
        if not img2img:
            opts.pop("strength", None)
        elif opts["num_inference_steps"] * opts["strength"] < 1:
            raise ConfigError(f"{self.model_id}: {opts['num_inference_steps']} steps at strength {opts['strength']} "
                              "run no denoising step", hint="raise steps or strength so that steps x strength >= 1")
        out = []
        for req in requests:
            size = output_size(*req.image.size, max_area, multiple=8)
            source = req.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            control = self.control_image(source)
            images = {"image": source, "control_image": control} if img2img else {"image": control}
            out.append(self.pipe(prompt=recipe_text(req), width=size[0], height=size[1],
                                 generator=generator(req.seed, self.device), **images, **opts).images[0])
        return out

    def family_params(self) -> dict[str, Any]:
        return {**self.control, "controlnet": self.controlnet, "prompt_from": "recipe caption"}
