"""Random-weight, full-size copies of the editing routes' repos (issue 14), for benchmarks/enrich.py and loops.

Same idea and layout as ``fullsize.py`` (whose helpers this module uses): real architectures at the released
configs, random weights (speed and memory do not depend on the values), scheduler and tokenizers from the tiny
folders of ``flywheel.testing.tiny.sdxl`` (CLIP pads to its real 77 tokens, so the sequence lengths are real).

- ``stabilityai/sdxl-turbo``: SDXL UNet (2.57 B; the turbo distillation keeps SDXL's architecture), CLIP-L,
  OpenCLIP bigG (with projection), SDXL VAE, as a ``StableDiffusionXLPipeline`` folder.
- ``diffusers/controlnet-canny-sdxl-1.0``: a full ControlNet of that UNet (1.25 B), as a model folder.
- ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``: the same with a 9-channel UNet input.
- ``black-forest-labs/FLUX.1-Fill-dev``: the FLUX.1 transformer with 384 input channels, T5-XXL, CLIP-L, VAE.

``sdxl_pipeline`` / ``flux_fill_pipeline`` build the same pipelines in memory (benchmarks/enrich.py);
``build_*`` write them in the Hugging Face cache layout (``fullsize.snapshot_dir``), so Flywheel resolves the
presets (``sdxl-turbo-canny``, ``sdxl-inpainting``, ``flux-fill-dev``) by hub id with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import fullsize

SDXL_TURBO, CONTROLNET_CANNY = "stabilityai/sdxl-turbo", "diffusers/controlnet-canny-sdxl-1.0"
SDXL_INPAINT, FLUX_FILL = "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "black-forest-labs/FLUX.1-Fill-dev"

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (sdxl-turbo's is the same).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                        "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SDXL_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025)


def sdxl_pipeline(kind: str, *, tiny: bool, device: str, dtype=None):
    """An SDXL inpainting (``kind="inpaint"``) or SDXL-Turbo + ControlNet (``"controlnet"``) pipeline, full size
    with random weights (tiny with ``tiny``), on ``device``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flywheel.testing.tiny.sdxl import (
        build_tiny_sdxl_controlnet,
        build_tiny_sdxl_inpaint,
    )

    inpaint = kind == "inpaint"
    folder = Path(tempfile.gettempdir()) / f"fw-bench-tiny-sdxl-{kind}"
    if not (folder / "model_index.json").exists():
        (build_tiny_sdxl_inpaint if inpaint else build_tiny_sdxl_controlnet)(folder)
    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLControlNetPipeline
    dtype = dtype or (torch.float32 if tiny else torch.bfloat16)
    pipe = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    if not tiny:
        tok = pipe.tokenizer
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        with fullsize._device_build(device, tiny):
            pipe.unet = UNet2DConditionModel(**{**SDXL_UNET, "in_channels": 9 if inpaint else 4})
            pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_CLIP_L, **ids))
            pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CLIP_G, **ids))
            pipe.vae = AutoencoderKL(**SDXL_VAE)
            if not inpaint:  # diffusers/controlnet-canny-sdxl-1.0 is a full copy of the UNet's encoder
                pipe.controlnet = ControlNetModel.from_unet(pipe.unet)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_fill_pipeline(*, tiny: bool, device: str):
    """FLUX.1 Fill [dev] size (the FLUX.1 transformer taking 384 channels), random weights, on ``device``."""
    import torch
    from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flywheel.testing.tiny.sdxl import build_tiny_flux_fill

    folder = Path(tempfile.gettempdir()) / "fw-bench-tiny-flux-fill"
    if not (folder / "model_index.json").exists():
        build_tiny_flux_fill(folder)
    pipe = FluxFillPipeline.from_pretrained(folder, dtype=torch.float32 if tiny else torch.bfloat16,
                                            use_safetensors=True)
    if not tiny:
        torch.manual_seed(0)
        with fullsize._device_build(device, tiny):
            pipe.transformer = FluxTransformer2DModel(**{**fullsize.FLUX_TRANSFORMER, "in_channels": 384,
                                                         "out_channels": 64})
            pipe.text_encoder_2 = T5EncoderModel(T5Config(**fullsize.T5_XXL))
            pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**fullsize.CLIP_L))
            pipe.vae = AutoencoderKL(**fullsize.FLUX_VAE)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_inpainting(cache: Path, *, tiny: bool, device: str) -> float:
    """diffusers/stable-diffusion-xl-1.0-inpainting-0.1 in its diffusers layout."""
    t0, snap = time.perf_counter(), fullsize.snapshot_dir(cache, SDXL_INPAINT)
    pipe = sdxl_pipeline("inpaint", tiny=tiny, device=device)
    pipe.save_pretrained(snap, safe_serialization=True, max_shard_size="10GB")
    del pipe
    fullsize._free()
    return fullsize._done(snap, t0, SDXL_INPAINT + (" (tiny)" if tiny else ""))


def build_sdxl_turbo_canny(cache: Path, *, tiny: bool, device: str) -> float:
    """stabilityai/sdxl-turbo (a StableDiffusionXLPipeline folder) and diffusers/controlnet-canny-sdxl-1.0 (a
    ControlNetModel folder: config.json and diffusion_pytorch_model.safetensors at its root)."""
    from diffusers import StableDiffusionXLPipeline

    t0, snap = time.perf_counter(), fullsize.snapshot_dir(cache, SDXL_TURBO)
    pipe = sdxl_pipeline("controlnet", tiny=tiny, device=device)
    components = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                                "unet", "scheduler")}
    StableDiffusionXLPipeline(**components).save_pretrained(snap, safe_serialization=True, max_shard_size="10GB")
    net = fullsize.snapshot_dir(cache, CONTROLNET_CANNY)
    pipe.controlnet.save_pretrained(net, safe_serialization=True, max_shard_size="10GB")
    (net / ".complete").write_text(CONTROLNET_CANNY)
    del pipe, components
    fullsize._free()
    return fullsize._done(snap, t0, SDXL_TURBO + (" (tiny)" if tiny else ""))


def build_flux_fill(cache: Path, *, tiny: bool, device: str) -> float:
    """black-forest-labs/FLUX.1-Fill-dev in its diffusers layout."""
    t0, snap = time.perf_counter(), fullsize.snapshot_dir(cache, FLUX_FILL)
    pipe = flux_fill_pipeline(tiny=tiny, device=device)
    pipe.save_pretrained(snap, safe_serialization=True, max_shard_size="10GB")
    del pipe
    fullsize._free()
    return fullsize._done(snap, t0, FLUX_FILL + (" (tiny)" if tiny else ""))
