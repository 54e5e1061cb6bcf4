"""Tiny random SDXL pipelines (inpainting; SDXL-Turbo + ControlNet) and FLUX.1 Fill, saved as diffusers folders.

Shapes follow the real models where the pipelines depend on them: two CLIP text encoders (the second with a
projection, its pooled output feeding the UNet's ``text_time`` embedding next to the 6 size/crop ids), a
4-block VAE (``vae_scale_factor`` 8), a 9-channel inpainting UNet (noisy latents + mask + masked image), a
ControlNet built from the UNet as diffusers' ``ControlNetModel.from_unet`` does for the released ones, and
FLUX.1 Fill's 384 input channels (latents, masked-image latents, the 8x8 mask packed 2x2).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_TEXT_DIM = 32  # each CLIP encoder; the UNet's cross-attention sees both, concatenated (64)


def _encoders(seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flywheel.testing.tiny.tokenizers import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=77, projection_dim=_TEXT_DIM, hidden_act="gelu",
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, CLIPTextModel(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def _unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    # addition_time_embed_dim 8 x 6 time ids + the pooled 32 = 80, as SDXL's 256 x 6 + 1280 = 2816.
    return UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=2 * _TEXT_DIM, norm_num_groups=8,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=64,
                         scaling_factor=0.13025)


def build_tiny_sdxl_inpaint(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``StableDiffusionXLInpaintPipeline`` folder (the layout of diffusers/stable-diffusion-xl-1.0-inpainting-0.1)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    folder = Path(folder)
    tok, te, te2 = _encoders(seed)
    torch.manual_seed(seed + 1)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=_unet(9),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("built tiny SDXL inpainting in %s", folder)
    return folder


def build_tiny_sdxl_controlnet(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``StableDiffusionXLControlNetPipeline`` folder: an SDXL-Turbo-like base (trailing timesteps, as
    stabilityai/sdxl-turbo's scheduler) with its ControlNet saved as a component."""
    import torch
    from diffusers import (
        ControlNetModel,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
    )

    folder = Path(folder)
    tok, te, te2 = _encoders(seed)
    torch.manual_seed(seed + 1)
    unet = _unet(4)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 64))
    # A new ControlNet's connections to the UNet start at zero and its conditioning encoder's default init
    # fades the image out over its eight convs: the control image would change nothing, where a trained one
    # steers the picture. Variance-keeping init and random connections let tests see edges and depth act.
    with torch.no_grad():
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.2)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        controlnet=controlnet, force_zeros_for_empty_prompt=True,
        scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  timestep_spacing="trailing"),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("built tiny SDXL + ControlNet in %s", folder)
    return folder


def build_tiny_flux_fill(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``FluxFillPipeline`` folder (FLUX.1-Fill-dev's layout): the tiny FLUX.1 components with a
    transformer taking 384 channels in and giving 64 out, as the released Fill transformer."""
    import tempfile

    import torch
    from diffusers import FluxFillPipeline, FluxPipeline, FluxTransformer2DModel

    from flywheel.testing.tiny.flux import build_tiny_flux

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        base = FluxPipeline.from_pretrained(build_tiny_flux(Path(tmp) / "flux"), use_safetensors=True)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    pipe = FluxFillPipeline(scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder,
                            tokenizer=base.tokenizer, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                            transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("built tiny FLUX.1 Fill in %s", folder)
    return folder
