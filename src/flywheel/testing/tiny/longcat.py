"""Tiny random LongCat-Image-Edit pipeline saved as a real diffusers folder.

Same classes as ``meituan-longcat/LongCat-Image-Edit``: a Qwen2.5-VL text encoder that also sees the image
(the tiny one from ``flywheel.testing.tiny.vlm``, with its Qwen2VLProcessor as ``text_processor``), the
FLUX.1-style ``AutoencoderKL`` (16 latent channels, 8x downsampling), ``LongCatImageTransformer2DModel``
(2x2 packed latents, double- and single-stream blocks) and the flow-matching scheduler.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def build_tiny_longcat_edit(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny ``LongCatImageEditPipeline`` folder and return it (deterministic)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline,
                           LongCatImageTransformer2DModel)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        te_dir = build_tiny_qwen2_vl(Path(tmp) / "te", "qwen2_5_vl", seed=seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(te_dir, use_safetensors=True)
        te_proc = AutoProcessor.from_pretrained(te_dir)
    # The released folder holds a Qwen2VLProcessor as text_processor (model_index.json), so does this one.
    processor = Qwen2VLProcessor(image_processor=te_proc.image_processor, tokenizer=te_proc.tokenizer,
                                 video_processor=te_proc.video_processor, chat_template=te_proc.chat_template)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4,) * 4, layers_per_block=1, norm_num_groups=2, use_quant_conv=False,
        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False,
    )
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        pooled_projection_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=[4, 6, 6],  # sum = head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=1.0,
        use_dynamic_shifting=True,
    )
    pipe = LongCatImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=processor.tokenizer, text_processor=processor, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    log.info("built tiny LongCatImageEditPipeline in %s", folder)
    return folder
