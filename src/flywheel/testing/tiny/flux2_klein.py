"""Tiny random FLUX.2 [klein] pipeline (the editor / generator of 2026) saved as a real diffusers folder.

Same classes and layout as ``black-forest-labs/FLUX.2-klein-4B``: a Qwen3 causal LM as text encoder (the
pipeline stacks the hidden states of layers 9, 18 and 27, so the tiny one keeps 28 layers, each a few
thousand parameters), a Qwen2 tokenizer with Qwen's chat template trained locally, ``AutoencoderKLFlux2``
(8x downsampling, 2x2 patchified latents with batch-norm statistics), ``Flux2Transformer2DModel`` with
double- and single-stream blocks, and the flow-matching scheduler. ``kv=True`` writes the
``Flux2KleinKVPipeline`` layout of ``FLUX.2-klein-9b-kv`` (same components, reference K/V cached).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def build_tiny_flux2_klein(folder: str | Path, *, distilled: bool = True, kv: bool = False, seed: int = 0) -> Path:
    """Write a tiny ``Flux2KleinPipeline`` (or ``Flux2KleinKVPipeline``) folder and return it (deterministic)."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline,
                           Flux2KleinPipeline, Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flywheel.testing.tiny.tokenizers import qwen2_tokenizer

    folder = Path(folder)
    tok = qwen2_tokenizer()
    torch.manual_seed(seed)
    hidden = 16
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok) + 8, hidden_size=hidden, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=True,
    ))
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=8, norm_num_groups=4,
        mid_block_add_attention=False,
    )  # 4 blocks: 8x downsampling as in the real VAE; patchified 2x2 -> 32 channels (128 in the real one)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,  # klein has no distilled-guidance input
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )
    parts = {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tok,
             "transformer": transformer}
    pipe = Flux2KleinKVPipeline(**parts) if kv else Flux2KleinPipeline(**parts, is_distilled=distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    n_params = sum(p.numel() for m in (text_encoder, vae, transformer) for p in m.parameters())
    log.info("built tiny %s (%d parameters) in %s", type(pipe).__name__, n_params, folder)
    return folder
