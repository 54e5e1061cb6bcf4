"""Named model presets: what ``captioner = "qwen2-vl-2b"`` in flywheel.toml means.

A preset maps a short name to a hub id, a family (which adapter loads it), the dtype it runs in on a GPU,
its default generation settings and roughly how much GPU memory it needs. Anywhere a preset name is
accepted, a local folder (or another hub id) works too; its family is then read from the folder.
The ``tiny*`` presets build tiny random models of the same architectures (``flywheel.testing.tiny``)
into a cache folder and load them through the same code as real weights: for CPU tests and demos.

Editors come in pairs where a public few-step LoRA exists: the stock settings (``qwen-image-edit-2511``:
40 steps, true CFG 4) and the fast ones (``qwen-image-edit-2511-lightning``: lightx2v's 4-step Lightning
LoRA, no CFG, the shift-3 schedule it was distilled with). The fast preset is the flux1 stack's editor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["vlm", "editor", "text_to_image"]
Family = Literal["qwen_vl", "qwen_image_edit", "instruct_pix2pix", "flux", "flux_kontext", "flux2_klein",
                 "flux2_klein_t2i", "longcat_edit", "sdxl_inpaint", "flux_fill", "sdxl_controlnet"]

ROLE_OF_FAMILY: dict[str, Role] = {
    "qwen_vl": "vlm", "qwen_image_edit": "editor", "instruct_pix2pix": "editor", "flux_kontext": "editor",
    "flux": "text_to_image", "flux2_klein": "editor", "longcat_edit": "editor", "flux2_klein_t2i": "text_to_image",
    "sdxl_inpaint": "editor", "flux_fill": "editor", "sdxl_controlnet": "editor",
}
# Bumped whenever a tiny builder changes, so stale cached tiny folders are rebuilt, not reused.
TINY_VERSION = "v2"


@dataclass(frozen=True)
class Licence:
    """The licence of a preset's weights (and of its LoRAs), as the model card names it."""

    name: str
    url: str
    commercial: bool  # the licence allows commercial use of the weights


APACHE = Licence("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0", commercial=True)
MIT = Licence("MIT", "https://opensource.org/license/mit", commercial=True)
FLUX1_DEV_NC = Licence("FLUX.1 [dev] Non-Commercial",
                       "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md", commercial=False)
FLUX_NC = Licence("FLUX Non-Commercial", "https://huggingface.co/black-forest-labs/FLUX.2-dev/blob/main/LICENSE.md",
                  commercial=False)
OPENRAIL_PP = Licence("CreativeML Open RAIL++-M", "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/"
                      "blob/main/LICENSE.md", commercial=True)  # use restrictions, commercial use allowed
SAI_NC = Licence("Stability AI Non-Commercial Research Community", "https://huggingface.co/stabilityai/sdxl-turbo/"
                 "blob/main/LICENSE.md", commercial=False)  # commercial use: https://stability.ai/license
QWEN_RESEARCH = Licence("Qwen Research", "https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/LICENSE",
                        commercial=False)
# The smallest card each preset runs on (GiB of GPU memory); above the last: "> 80 GB".
VRAM_CLASSES = (8, 16, 24, 48, 80)


def vram_class(gib: float) -> str:
    """The smallest card class that holds ``gib`` (a preset's bf16 estimate or measurement)."""
    return next((f"{c} GB" for c in VRAM_CLASSES if gib <= c), f"> {VRAM_CLASSES[-1]} GB")


@dataclass(frozen=True)
class Preset:
    name: str
    family: Family
    hub_id: str | None  # None for tiny presets (built locally)
    dtype: str = "bfloat16"  # on GPU; every family runs float32 on CPU
    settings: dict[str, Any] = field(default_factory=dict)  # passed to the adapter's from_pretrained
    vram_gib: float = 0.0  # approximate, bf16, weights + a batch of 8 (qwen2-vl-2b: measured, docs/models.md)
    vram_gib_nf4: float | None = None
    tiny: tuple[str, str, dict[str, Any]] | None = None  # (module, builder function, kwargs)
    note: str = ""
    licence: Licence | None = None  # None for tiny presets (random weights built here)
    # GB (10^9 bytes) of the files the loader fetches (``hub.allow_patterns``), LoRAs included; approximate,
    # sources in docs/models.md ("Licences, sizes, VRAM classes").
    disk_gb: float = 0.0
    low_vram: str = ""  # a smaller card it fits with quantization / offload, e.g. "24 GB with fp8 + cpu_offload"
    generate_with: str | None = None  # a LoRA base whose LoRAs render on another model (klein base -> klein)

    @property
    def role(self) -> Role:
        return ROLE_OF_FAMILY[self.family]

    @property
    def vram_class(self) -> str:
        """The smallest card the preset runs on with its own settings (bf16, no offload); "CPU" for tiny ones."""
        return "CPU" if self.tiny else vram_class(self.vram_gib)


_VLM = {"max_pixels": 1024 * 1024}
_TINY_VLM = ("flywheel.testing.tiny.vlm", "build_tiny_qwen2_vl")
_TINY_FLUX = {"num_inference_steps": 2, "max_sequence_length": 32}
# Few-step editor LoRAs (hub repo + file, fetched alone: the repos hold several variants). Lightning: 4 or 8
# steps at true CFG 1 with a fixed shift of 3 (ModelTC/Qwen-Image-Lightning, Apache-2.0). Its README warns
# that it gives grid artifacts on a base cast naively to fp8: use bf16, int8 or nf4 with it, not fp8.
_LIGHTNING = "lightx2v/Qwen-Image-Edit-2511-Lightning"
_QWEN_FAST = {"true_cfg_scale": 1.0, "scheduler_shift": 3.0}
# No few-step LoRA trained on Kontext is public; FLUX.1-dev's 8-step Turbo-Alpha LoRA works on it (nunchaku
# ships Kontext + this LoRA as its turbo workflow). Same non-commercial licence as Kontext [dev].
_KONTEXT_TURBO = {"hub": "alimama-creative/FLUX.1-Turbo-Alpha", "weight": "diffusion_pytorch_model.safetensors",
                  "scale": 1.0}
# FireRed publishes one distilled LoRA, for FireRed-Image-Edit-1.0 (8 steps, CFG off, the stock scheduler in its
# model card; FireRed's `inference.py --optimized` loads it). None is published for 1.1 itself: check the edits.
_FIRERED_LIGHTNING = {"hub": "FireRedTeam/FireRed-Image-Edit-1.0-Lightning",
                      "weight": "FireRed-Image-Edit-1.0-Lightning-8steps-v1.0.safetensors", "scale": 1.0}
_TINY_KLEIN = {"num_inference_steps": 2, "max_area": 64 * 64, "max_sequence_length": 32}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("qwen2-vl-2b", "qwen_vl", "Qwen/Qwen2-VL-2B-Instruct", settings=_VLM, vram_gib=6.1, vram_gib_nf4=3.4,
           note="the flux1 stack's captioner and judge", licence=APACHE, disk_gb=4.4),
    Preset("qwen2-vl-7b", "qwen_vl", "Qwen/Qwen2-VL-7B-Instruct", settings=_VLM, vram_gib=17.5, vram_gib_nf4=6.5,
           licence=APACHE, disk_gb=16.6, low_vram="8 GB with nf4"),
    Preset("qwen2.5-vl-3b", "qwen_vl", "Qwen/Qwen2.5-VL-3B-Instruct", settings=_VLM, vram_gib=8.5, vram_gib_nf4=3.5,
           licence=QWEN_RESEARCH, disk_gb=7.5, low_vram="8 GB with nf4"),
    Preset("qwen2.5-vl-7b", "qwen_vl", "Qwen/Qwen2.5-VL-7B-Instruct", settings=_VLM, vram_gib=17.5, vram_gib_nf4=6.5,
           licence=APACHE, disk_gb=16.6, low_vram="8 GB with nf4"),
    Preset("qwen3-vl-8b", "qwen_vl", "Qwen/Qwen3-VL-8B-Instruct", settings=_VLM, vram_gib=19.0, vram_gib_nf4=7.0,
           note="needs transformers>=4.57", licence=APACHE, disk_gb=17.5, low_vram="8 GB with nf4"),
    Preset("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", vram_gib=33.0,
           settings={"num_inference_steps": 28, "guidance_scale": 3.5}, note="gated: accept the licence on the hub",
           licence=FLUX1_DEV_NC, disk_gb=33.7, low_vram="24 GB with fp8 + cpu_offload"),
    Preset("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell", vram_gib=33.0,
           settings={"num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256},
           licence=APACHE, disk_gb=33.7, low_vram="24 GB with fp8 + cpu_offload"),
    Preset("flux-kontext-dev", "flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev", vram_gib=34.0,
           settings={"num_inference_steps": 28, "guidance_scale": 2.5},
           note="stock settings; gated: accept the licence on the hub",
           licence=FLUX1_DEV_NC, disk_gb=33.7, low_vram="24 GB with fp8 + cpu_offload"),
    Preset("flux-kontext-dev-turbo", "flux_kontext", "black-forest-labs/FLUX.1-Kontext-dev", vram_gib=34.5,
           settings={"num_inference_steps": 8, "guidance_scale": 2.5, "loras": [_KONTEXT_TURBO]},
           note="8 steps with FLUX.1-dev's Turbo-Alpha LoRA (not trained on Kontext: check the edits); gated",
           licence=FLUX1_DEV_NC, disk_gb=34.4, low_vram="24 GB with fp8 + cpu_offload"),
    Preset("qwen-image-edit", "qwen_image_edit", "Qwen/Qwen-Image-Edit", vram_gib=58.0,
           settings={"num_inference_steps": 40, "true_cfg_scale": 4.0},
           licence=APACHE, disk_gb=57.7, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    Preset("qwen-image-edit-2511", "qwen_image_edit", "Qwen/Qwen-Image-Edit-2511", vram_gib=58.0,
           settings={"num_inference_steps": 40, "true_cfg_scale": 4.0}, note="stock settings; several references",
           licence=APACHE, disk_gb=57.7, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    Preset("qwen-image-edit-2511-lightning", "qwen_image_edit", "Qwen/Qwen-Image-Edit-2511", vram_gib=58.0,
           settings={"num_inference_steps": 4, **_QWEN_FAST, "loras": [
               {"hub": _LIGHTNING, "weight": "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"}]},
           note="the flux1 stack's editor: 4 steps with the Lightning LoRA; not with fp8 quantization",
           licence=APACHE, disk_gb=58.6, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    Preset("qwen-image-edit-2511-lightning-8step", "qwen_image_edit", "Qwen/Qwen-Image-Edit-2511", vram_gib=58.0,
           settings={"num_inference_steps": 8, **_QWEN_FAST, "loras": [
               {"hub": _LIGHTNING, "weight": "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors"}]},
           note="8 steps with the 8-step Lightning LoRA; not with fp8 quantization",
           licence=APACHE, disk_gb=58.6, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    Preset("instruct-pix2pix", "instruct_pix2pix", "timbrooks/instruct-pix2pix", vram_gib=3.5,
           settings={"num_inference_steps": 20, "guidance_scale": 7.5, "image_guidance_scale": 1.5},
           licence=MIT, disk_gb=4.3),
    # Tiny random models: same architectures, CPU-sized. Settings keep them fast (64 px, 2 steps).
    Preset("tiny-qwen2-vl", "qwen_vl", None, dtype="float32", settings={"max_pixels": 112 * 112},
           tiny=(*_TINY_VLM, {"variant": "qwen2_vl"}), note="random weights, for tests"),
    Preset("tiny-qwen2.5-vl", "qwen_vl", None, dtype="float32", settings={"max_pixels": 112 * 112},
           tiny=(*_TINY_VLM, {"variant": "qwen2_5_vl"}), note="random weights, for tests"),
    Preset("tiny-qwen-image-edit", "qwen_image_edit", None, dtype="float32",
           settings={"num_inference_steps": 2, "true_cfg_scale": 1.0, "max_area": 64 * 64},
           tiny=("flywheel.testing.tiny.qwen_image", "build_tiny_qwen_image_edit", {}), note="random weights, for tests"),
    Preset("tiny-instruct-pix2pix", "instruct_pix2pix", None, dtype="float32",
           settings={"num_inference_steps": 2, "max_area": 64 * 64},
           tiny=("flywheel.testing.tiny.pix2pix", "build_tiny_pix2pix", {}), note="random weights, for tests"),
    Preset("tiny-flux", "flux", None, dtype="float32", settings=_TINY_FLUX,
           tiny=("flywheel.testing.tiny.flux", "build_tiny_flux", {}), note="random weights, for tests"),
    Preset("tiny-flux-kontext", "flux_kontext", None, dtype="float32", settings={**_TINY_FLUX, "auto_resize": False},
           tiny=("flywheel.testing.tiny.flux", "build_tiny_flux", {}), note="random weights, for tests"),
    # Editors and captioners of 2026 (issue 11; sources in docs/enrich.md and docs/models.md). VRAM figures are
    # estimates from the weights' sizes (bf16 weights + activations at 1024²), not measurements.
    Preset("firered-image-edit-1.1", "qwen_image_edit", "FireRedTeam/FireRed-Image-Edit-1.1", vram_gib=58.0,
           settings={"num_inference_steps": 50, "true_cfg_scale": 4.0},
           note="stock settings; Qwen-Image-Edit-Plus architecture, several references (VRAM: estimate)",
           licence=APACHE, disk_gb=57.7, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    Preset("firered-image-edit-1.1-lightning", "qwen_image_edit", "FireRedTeam/FireRed-Image-Edit-1.1", vram_gib=58.0,
           settings={"num_inference_steps": 8, "true_cfg_scale": 1.0, "loras": [_FIRERED_LIGHTNING]},
           note="8 steps with FireRed's Lightning LoRA (published for 1.0: check the edits); not with fp8",
           licence=APACHE, disk_gb=58.6, low_vram="24 GB with nf4 + cpu_offload (estimate)"),
    # References at 512² and compiled blocks: 0.90 s per 1024² edit with 2 references on an H200, against
    # 1.49 s with 1024² references and no compile (docs/models.md); the edited image stays at 1024².
    Preset("flux2-klein-4b", "flux2_klein", "black-forest-labs/FLUX.2-klein-4B", vram_gib=17.3,
           settings={"num_inference_steps": 4, "guidance_scale": 1.0, "reference_area": 512 * 512, "speed": "auto"},
           note="distilled, 4 steps; source + references at 512² (VRAM: 17.3 GiB measured)",
           licence=APACHE, disk_gb=16.0, low_vram="16 GB with fp8 (estimate)"),
    Preset("flux2-klein-base-4b-edit", "flux2_klein", "black-forest-labs/FLUX.2-klein-base-4B", vram_gib=17.0,
           settings={"num_inference_steps": 50, "guidance_scale": 4.0},
           note="stock settings of the undistilled base (50 steps, CFG 4): slow; the one LoRAs train on",
           licence=APACHE, disk_gb=16.0, low_vram="16 GB with fp8 (estimate)"),
    Preset("flux2-klein-9b", "flux2_klein", "black-forest-labs/FLUX.2-klein-9B", vram_gib=36.0,
           settings={"num_inference_steps": 4, "guidance_scale": 1.0},
           note="distilled, 4 steps; non-commercial (VRAM: estimate)",
           licence=FLUX_NC, disk_gb=35.0, low_vram="24 GB with fp8 (estimate)"),
    Preset("flux2-klein-9b-kv", "flux2_klein", "black-forest-labs/FLUX.2-klein-9b-kv", vram_gib=36.0,
           settings={"num_inference_steps": 4},
           note="9B trained for the references' KV cache (Flux2KleinKVPipeline); non-commercial (VRAM: estimate)",
           licence=FLUX_NC, disk_gb=35.0, low_vram="24 GB with fp8 (estimate)"),
    Preset("longcat-image-edit", "longcat_edit", "meituan-longcat/LongCat-Image-Edit", vram_gib=30.0,
           settings={"num_inference_steps": 50, "guidance_scale": 4.5},
           note="stock settings; one image per edit, no references (VRAM: estimate)",
           licence=APACHE, disk_gb=29.3, low_vram="24 GB with cpu_offload (~18 GB per the LongCat team)"),
    Preset("longcat-image-edit-turbo", "longcat_edit", "meituan-longcat/LongCat-Image-Edit-Turbo", vram_gib=30.0,
           settings={"num_inference_steps": 8, "guidance_scale": 1.0},
           note="distilled: 8 steps, CFG off; one image per edit (VRAM: estimate)",
           licence=APACHE, disk_gb=29.3, low_vram="24 GB with cpu_offload (~18 GB per the LongCat team)"),
    Preset("qwen3-vl-2b", "qwen_vl", "Qwen/Qwen3-VL-2B-Instruct", settings=_VLM, vram_gib=6.5, vram_gib_nf4=3.5,
           note="needs transformers>=4.57 (VRAM: estimate)", licence=APACHE, disk_gb=4.3),
    Preset("qwen3-vl-4b", "qwen_vl", "Qwen/Qwen3-VL-4B-Instruct", settings=_VLM, vram_gib=11.0, vram_gib_nf4=5.0,
           note="default captioner and judge; needs transformers>=4.57 (VRAM: estimate)", licence=APACHE, disk_gb=8.9,
           low_vram="8 GB with nf4"),
    Preset("tiny-qwen3-vl", "qwen_vl", None, dtype="float32", settings={"max_pixels": 112 * 112},
           tiny=(*_TINY_VLM, {"variant": "qwen3_vl"}), note="random weights, for tests"),
    Preset("tiny-flux2-klein", "flux2_klein", None, dtype="float32", settings=_TINY_KLEIN,
           tiny=("flywheel.testing.tiny.flux2_klein", "build_tiny_flux2_klein", {}), note="random weights, for tests"),
    Preset("tiny-flux2-klein-kv", "flux2_klein", None, dtype="float32", settings=_TINY_KLEIN,
           tiny=("flywheel.testing.tiny.flux2_klein", "build_tiny_flux2_klein", {"kv": True}),
           note="random weights, for tests"),
    # LoRA bases of FLUX.2 klein (issue 11): LoRAs train on the undistilled base and render on the distilled
    # klein of the same size (generate_with), 4 steps. VRAM: the base in bf16 for training at 1024² (estimate).
    Preset("flux2-klein-base-4b", "flux2_klein_t2i", "black-forest-labs/FLUX.2-klein-base-4B", vram_gib=17.0,
           settings={"num_inference_steps": 50, "guidance_scale": 4.0}, generate_with="flux2-klein-4b",
           note="LoRA base; its LoRAs render on flux2-klein-4b (4 steps) (VRAM: estimate)",
           licence=APACHE, disk_gb=16.0, low_vram="16 GB with fp8 (estimate)"),
    Preset("flux2-klein-base-9b", "flux2_klein_t2i", "black-forest-labs/FLUX.2-klein-base-9B", vram_gib=36.0,
           settings={"num_inference_steps": 50, "guidance_scale": 4.0}, generate_with="flux2-klein-9b",
           note="LoRA base; its LoRAs render on flux2-klein-9b (4 steps); non-commercial (VRAM: estimate)",
           licence=FLUX_NC, disk_gb=35.0, low_vram="24 GB with fp8 (estimate)"),
    Preset("tiny-flux2-klein-base", "flux2_klein_t2i", None, dtype="float32",
           settings={"num_inference_steps": 2, "max_sequence_length": 32}, generate_with="tiny-flux2-klein",
           tiny=("flywheel.testing.tiny.flux2_klein", "build_tiny_flux2_klein", {"distilled": False}),
           note="random weights, for tests (the tiny klein's undistilled twin)"),
    Preset("tiny-longcat-image-edit", "longcat_edit", None, dtype="float32",
           settings={"num_inference_steps": 2, "guidance_scale": 1.0},
           tiny=("flywheel.testing.tiny.longcat", "build_tiny_longcat_edit", {}), note="random weights, for tests"),
]}

# The inpainting and structure-conditioned routes (issue 14; docs/enrich.md). VRAM: estimates from the weights.
_SDXL_CANNY = "diffusers/controlnet-canny-sdxl-1.0"
PRESETS.update({p.name: p for p in [
    Preset("sdxl-inpainting", "sdxl_inpaint", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", vram_gib=12.0,
           settings={"num_inference_steps": 30, "guidance_scale": 8.0, "strength": 0.99},
           note="repaints the background around the masked character (kept pixel for pixel)",
           licence=OPENRAIL_PP, disk_gb=13.9),
    Preset("flux-fill-dev", "flux_fill", "black-forest-labs/FLUX.1-Fill-dev", vram_gib=34.0,
           settings={"num_inference_steps": 50, "guidance_scale": 30.0},
           note="FLUX.1 Fill: repaints around the masked character; gated: accept the licence on the hub",
           licence=FLUX1_DEV_NC, disk_gb=33.7, low_vram="24 GB with fp8 + cpu_offload"),
    Preset("sdxl-turbo-canny", "sdxl_controlnet", "stabilityai/sdxl-turbo", vram_gib=14.0,
           settings={"num_inference_steps": 4, "guidance_scale": 0.0, "controlnet": _SDXL_CANNY},
           note="4 steps, Canny edges keep pose and layout; ControlNet: diffusers (OpenRAIL++)",
           licence=SAI_NC, disk_gb=21.4),
    Preset("sdxl-turbo-depth", "sdxl_controlnet", "stabilityai/sdxl-turbo", vram_gib=15.0,
           settings={"num_inference_steps": 4, "guidance_scale": 0.0, "control": "depth",
                     "controlnet": "diffusers/controlnet-depth-sdxl-1.0",
                     "depth_model": "depth-anything/Depth-Anything-V2-Small-hf"},
           note="4 steps, a depth map (Depth Anything V2 Small) keeps pose and layout",
           licence=SAI_NC, disk_gb=21.5),
    Preset("tiny-sdxl-inpainting", "sdxl_inpaint", None, dtype="float32",
           settings={"num_inference_steps": 2, "max_area": 64 * 64},
           tiny=("flywheel.testing.tiny.sdxl", "build_tiny_sdxl_inpaint", {}), note="random weights, for tests"),
    Preset("tiny-flux-fill", "flux_fill", None, dtype="float32",
           settings={"num_inference_steps": 2, "max_area": 64 * 64, "max_sequence_length": 32},
           tiny=("flywheel.testing.tiny.sdxl", "build_tiny_flux_fill", {}), note="random weights, for tests"),
    Preset("tiny-sdxl-turbo-controlnet", "sdxl_controlnet", None, dtype="float32",
           settings={"num_inference_steps": 2, "max_area": 64 * 64},
           tiny=("flywheel.testing.tiny.sdxl", "build_tiny_sdxl_controlnet", {}), note="random weights, for tests"),
]})

# "tiny" means the tiny model of the default family for whichever role asks for it.
TINY_FOR_ROLE: dict[Role, str] = {"vlm": "tiny-qwen2-vl", "editor": "tiny-qwen-image-edit", "text_to_image": "tiny-flux"}


def get_preset(name: str, role: Role | None = None) -> Preset | None:
    """The preset called ``name`` (``"tiny"`` resolved for ``role``), or None if it is not a preset name."""
    if name == "tiny":
        return PRESETS[TINY_FOR_ROLE[role or "vlm"]]
    return PRESETS.get(name)


def suggest(name: str) -> str | None:
    close = difflib.get_close_matches(name, [*PRESETS, "tiny"], n=1, cutoff=0.6)
    return close[0] if close else None
