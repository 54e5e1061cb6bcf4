"""A tiny random FLUX.1 pipeline (same architecture as FLUX.1-dev, ~1 MB), saved as a real diffusers folder.

Tests load it through the same ``FluxPipeline.from_pretrained`` / ``FluxKontextPipeline.from_pretrained``
code users run on the real weights. Shapes follow the real model where it matters: the VAE has 4 blocks
(``vae_scale_factor`` 8) and 16 latent channels, the transformer packs 2x2 latents (``in_channels`` 64),
uses the guidance embedding and FLUX's dynamic-shift scheduler. The CLIP and T5 tokenizers are trained
here on a small corpus, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 0
COMPLETE_MARKER = ".flywheel-tiny-complete"
_CORPUS = [
    "a photo of fw_test standing on a beach at sunset",
    "a portrait of a character with red hair, studio lighting",
    "make it blue, change the background to a forest",
    "an astronaut riding a horse in the desert, wide shot",
    "close-up of a face, soft light, detailed eyes, smiling",
    "a cartoon character in a city street at night, rain",
    "full body shot, walking, snowy mountains, cinematic",
    "the same character sitting in a cafe reading a book",
    "low angle, dramatic light, looking at the camera",
    "a watercolor painting of a cat on a windowsill",
] * 4


def build_tiny_flux(folder: Path) -> Path:
    """Build (once) and save the tiny FLUX pipeline in ``folder``; returns ``folder``.

    Idempotent: a folder that already holds a complete build is returned untouched. The build goes to a
    temporary sibling folder that is renamed at the end, so an interrupted build never looks complete.
    """
    folder = Path(folder)
    if (folder / COMPLETE_MARKER).is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        # 1. Tokenizers, trained locally (the real vocabularies would need the Hub).
        clip_tok = CLIPTokenizer(model_max_length=77).train_new_from_iterator(_CORPUS, vocab_size=300)
        t5_tok = T5TokenizerFast(extra_ids=0).train_new_from_iterator(_CORPUS, vocab_size=200)
        # 2. Random models, deterministic.
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        vae = AutoencoderKL(
            latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16,) * 4, layers_per_block=1, norm_num_groups=8, use_quant_conv=False,
            use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
        )
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
        pipe = FluxPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
            text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
        )
        # 3. Save as safetensors, mark complete, move into place.
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / COMPLETE_MARKER).write_text("tiny FLUX.1 built by flywheel.testing.tiny.flux\n", encoding="utf-8")
        if folder.exists():  # an earlier, interrupted build
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny FLUX pipeline in %s", folder)
    return folder

