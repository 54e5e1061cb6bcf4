"""The character's mask for the inpainting editors: find it, feather its edge, paste the source back inside it.

Inpainting repaints only what the mask leaves out, and afterwards the source is composited back inside the
mask, so the character's pixels are the source's bytes (identity holds by construction, whatever the
pipeline did). The mask's alpha is 255 on every pixel of the character (P(subject) > 0.5) and on a margin
of ``grow`` pixels around it, then falls linearly to 0 over ``feather`` pixels: the feathered band blends the
repainted background into the kept pixels, and nothing inside it is cut.

Segmenters: ``mediapipe`` (the person segmenter the composite editor uses, CPU, people only; its mask is
measured by ``flywheel.signals.segmentation.mask_quality``) or ``sam`` (Segment Anything through
transformers, prompted with points, for characters that are not people; a GPU makes it fast).
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from flywheel.errors import ConfigError
from flywheel.models.pool import helper_model

log = logging.getLogger(__name__)


def subject_probability(image: Image.Image, segmenter: str = "mediapipe", *, sam_model: str | None = None,
                        device: str = "cpu", points: list[tuple[float, float]] | None = None):
    """HxW floats in [0, 1]: how likely each pixel belongs to the character."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"))
    if segmenter == "mediapipe":
        from flywheel.signals.segmentation import selfie_segmenter

        result = selfie_segmenter(0).process(rgb)
        return np.clip(np.asarray(result.segmentation_mask, dtype=np.float32), 0.0, 1.0)
    if segmenter == "sam":
        if not sam_model:
            raise ConfigError("segmenter 'sam' needs a model", hint='set sam_model, e.g. "facebook/sam-vit-base"')
        return _sam_probability(image, sam_model, device, points or [(0.5, 0.5)])
    raise ConfigError(f"unknown segmenter {segmenter!r}", hint="use 'mediapipe' (people) or 'sam' (anything)")


@helper_model
def _sam(spec: str, device: str):
    from transformers import SamModel, SamProcessor

    from flywheel.models.hub import resolve_model

    folder = resolve_model(spec)
    return SamProcessor.from_pretrained(folder), SamModel.from_pretrained(folder, use_safetensors=True).to(device).eval()


def _sam_probability(image: Image.Image, spec: str, device: str, points: list[tuple[float, float]]):
    """SAM's best mask (by its own IoU estimate) for foreground points given as fractions of width and height
    (default: the image centre, where the character stands in most source photos)."""
    import torch

    processor, model = _sam(spec, device)
    w, h = image.size
    inputs = processor(image.convert("RGB"), input_points=[[[[x * w, y * h] for x, y in points]]],
                       return_tensors="pt").to(device)
    with torch.no_grad():
        out = model(**inputs, multimask_output=True)
    masks = processor.image_processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                         inputs["reshaped_input_sizes"].cpu(), binarize=False)
    scores = out.iou_scores[0, 0].float().cpu()
    best = int(scores.argmax())
    return torch.sigmoid(masks[0][0, best].float()).numpy()


def feathered_alpha(prob, *, grow: int = 4, feather: int = 8):
    """uint8 alpha: 255 on the character and ``grow`` px around it, falling to 0 over the next ``feather`` px."""
    import cv2
    import numpy as np

    outside = (np.asarray(prob) <= 0.5).astype(np.uint8)
    if outside.all():  # no character found: everything is repainted (the mask report says it failed)
        return np.zeros(outside.shape, np.uint8)
    # Distance of every pixel from the nearest character pixel (0 on the character itself).
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    ramp = 1.0 - (dist - grow) / max(feather, 1)
    alpha = np.rint(np.clip(ramp, 0.0, 1.0) * 255).astype(np.uint8)
    alpha[dist <= grow] = 255  # exact, whatever the float arithmetic above did
    return alpha


def composite_back(source: Image.Image, generated: Image.Image, alpha) -> Image.Image:
    """``source`` where alpha is 255 (its exact bytes), ``generated`` where it is 0, blended in between."""
    import numpy as np

    src = np.asarray(source.convert("RGB"), dtype=np.uint32)
    gen = np.asarray(generated.convert("RGB").resize(source.size, Image.Resampling.LANCZOS), dtype=np.uint32)
    a = np.asarray(alpha, dtype=np.uint32)[..., None]
    out = (src * a + gen * (255 - a) + 127) // 255  # integer blend: a = 255 gives src exactly
    return Image.fromarray(out.astype(np.uint8))


def mask_report(prob, segmenter: str) -> dict[str, Any]:
    """The mask's quality (``mask_quality``) as the composite editor reports it; the judge rejects a failed one."""
    from flywheel.signals.segmentation import mask_quality

    return {**mask_quality(prob).as_dict(), "segmenter": segmenter}

