"""Tiny random Qwen2-VL / Qwen2.5-VL saved as real Hugging Face folders.

Same classes, config keys, processor and chat template as ``Qwen/Qwen2-VL-2B-Instruct`` (or
``Qwen2.5-VL``), only a few hundred thousand parameters: ``AutoModelForImageTextToText`` and
``AutoProcessor`` load the folder exactly as they load the real one.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

VARIANTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def build_tiny_qwen2_vl(folder: str | Path, variant: str = "qwen2_vl", *, seed: int = 0) -> Path:
    """Write a tiny random ``variant`` model + processor to ``folder`` and return it (deterministic)."""
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from flywheel.testing.tiny.tokenizers import QWEN2_VL_CHAT_TEMPLATE, qwen2_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny VLM variant {variant!r}; expected one of {VARIANTS}")
    folder = Path(folder)
    tok = qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>",
                                                     "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    # Small pixel limits keep tiny images at a handful of patches; the real ones are 56² .. 3584².
    pixel_limits = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    image_proc = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=pixel_limits)
    video_proc = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=pixel_limits)
    text = dict(
        vocab_size=len(tok) + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},  # sum = head_dim/2
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
        processor = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    elif variant == "qwen3_vl":
        from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                                  Qwen3VLVideoProcessor)

        # Qwen3-VL: 16 px patches, a learned position grid and deepstack features from inner vision blocks.
        image_proc = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, size=pixel_limits)
        video_proc = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, size=pixel_limits)
        text3 = {**text, "head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                             "mrope_section": [4, 2, 2], "mrope_interleaved": True}}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text3, vision_config=vision, **special))
        processor = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
        processor = Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                        chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    log.info("built tiny %s (%d parameters) in %s", variant, sum(p.numel() for p in model.parameters()), folder)
    return folder
