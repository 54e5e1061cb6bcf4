"""A tiny random Depth Anything V2 (``DepthAnythingForDepthEstimation`` + its DPT image processor) saved as a
transformers folder.

The real architecture of depth-anything/Depth-Anything-V2-Small-hf (a DINOv2 backbone whose layers 3/6/9/12
feed a DPT neck of reassemble and fusion stages, then a relative-depth head) with a 2-layer, 32-wide backbone
at 56 px instead of 518; the processor keeps the aspect ratio and a multiple of the 14 px patch as the real
one does, so a depth map of any source size comes out as with the real model.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def build_tiny_depth_anything(folder: str | Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    folder = Path(folder)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, apply_layernorm=True, initializer_range=0.15)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=32,
                                 reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[8, 16, 16, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type="relative",
                                 initializer_range=0.15)
    # At the real 0.02 init the tiny net's depths are ~1e-7; at 0.15 they span about 0-1.5, like the real
    # model's relative depths, so the depth map's scaling is exercised at a realistic magnitude.
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder, safe_serialization=True)
    DPTImageProcessor(do_resize=True, size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                      ensure_multiple_of=14, resample=3, do_rescale=True, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_pad=False).save_pretrained(folder)
    log.info("built tiny Depth Anything V2 in %s", folder)
    return folder
