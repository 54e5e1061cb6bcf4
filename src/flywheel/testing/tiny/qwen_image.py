"""Tiny random Qwen-Image-Edit(-Plus) pipeline saved as a real diffusers folder.

Components are the real classes (AutoencoderKLQwenImage, QwenImageTransformer2DModel, a Qwen2.5-VL text
encoder with its processor, FlowMatchEuler scheduler), shrunk to a few hundred thousand parameters.
The text encoder is the tiny Qwen2.5-VL from ``flywheel.testing.tiny.vlm``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def build_tiny_qwen_image_edit(folder: str | Path, *, plus: bool = True, seed: int = 0) -> Path:
    """Write a tiny QwenImageEditPlusPipeline (``plus=False``: QwenImageEditPipeline) folder; return it."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,
                           QwenImageEditPlusPipeline, QwenImageTransformer2DModel)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        te_dir = build_tiny_qwen2_vl(Path(tmp) / "te", "qwen2_5_vl", seed=seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(te_dir, use_safetensors=True)
        te_proc = AutoProcessor.from_pretrained(te_dir)
    # The released Qwen-Image-Edit folders hold a Qwen2VLProcessor (model_index.json), so does this one.
    processor = Qwen2VLProcessor(image_processor=te_proc.image_processor, tokenizer=te_proc.tokenizer,
                                 video_processor=te_proc.video_processor, chat_template=te_proc.chat_template)
    torch.manual_seed(seed)
    # base_dim 4: the Plus pipeline always VAE-encodes references at ~1024², the slow part on a CPU.
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6),  # sum = head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential",
    )
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor.tokenizer,
               processor=processor, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("built tiny %s in %s", cls.__name__, folder)
    return folder
