"""A tiny random Segment Anything (``SamModel`` + ``SamProcessor``) saved as a transformers folder.

The real architecture (ViT image encoder with windowed and global attention, prompt encoder, two-way mask
decoder) at 64 px instead of 1024; the processor resizes to 64 and pads to 64, so the whole promptable path
(points in source pixels, masks post-processed back to the source's size) runs as with facebook/sam-vit-*.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def build_tiny_sam(folder: str | Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    folder = Path(folder)
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(seed)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).save_pretrained(
        folder, safe_serialization=True)
    SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16})).save_pretrained(folder)
    log.info("built tiny SAM in %s", folder)
    return folder
