"""How much an edit changed an image compared with its parent, overall and in subject vs background.

Both images are compared at one working scale (the child is resized to the parent's aspect-corrected
work size) after a light blur, so re-encoding noise and one-pixel resampling shifts do not count as an
edit. A pixel "changed" when any channel moved by more than ``PIXEL_THRESHOLD`` (0..1 scale).

Subject vs background uses a person mask of the parent: mediapipe's selfie segmentation when the
package is installed (the model ships inside the wheel, so it works offline), else a centre prior
(an ellipse covering the middle of the frame, where portraits put the character). The mask used is
recorded in ``mask`` so a score can always be traced to how it was computed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

WORK_SIDE = 256
PIXEL_THRESHOLD = 0.08
BLUR_SIGMA = 1.0


@dataclass(frozen=True)
class ChangeMeasure:
    changed_fraction: float  # share of pixels that changed (0 = identical, 1 = all different)
    mean_abs_diff: float  # mean absolute RGB difference, 0..1
    subject_changed_fraction: float
    background_changed_fraction: float
    subject_area: float  # share of the frame the mask calls subject
    mask: str  # "mediapipe_selfie" or "centre_prior"
    size_changed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _rgb_at(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BOX if rgb.width > size[0] else Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _work_size(image: Image.Image) -> tuple[int, int]:
    scale = WORK_SIDE / max(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def centre_prior(height: int, width: int) -> np.ndarray:
    """Boolean ellipse over the central ~45% of the frame: where a portrait's subject usually is."""
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    return ((yy - cy) / (0.42 * height)) ** 2 + ((xx - cx) / (0.34 * width)) ** 2 <= 1.0


def _selfie_segmenter():
    """The shared mediapipe segmenter, or None when mediapipe is not installed (the centre prior is used)."""
    from flywheel.errors import MissingExtraError
    from flywheel.signals.segmentation import selfie_segmenter

    try:
        return selfie_segmenter(0)
    except MissingExtraError:
        log.info("mediapipe is not installed: subject/background change uses a centre prior")
        return None


def person_mask(image: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(boolean subject mask at ``size``, how it was made). Falls back to the centre prior when no person."""
    seg = _selfie_segmenter()
    if seg is not None:
        arr = np.ascontiguousarray(np.asarray(image.convert("RGB").resize(size), dtype=np.uint8))
        result = seg.process(arr)
        if result.segmentation_mask is not None:
            mask = np.asarray(result.segmentation_mask) > 0.5
            # A mask of (almost) nothing means no person was found: a prior beats an empty subject.
            if 0.02 <= mask.mean() <= 0.98:
                return mask, "mediapipe_selfie"
    return centre_prior(size[1], size[0]), "centre_prior"


def measure_change(parent: Image.Image, child: Image.Image, *, use_segmentation: bool = True) -> ChangeMeasure:
    from scipy.ndimage import gaussian_filter

    size = _work_size(parent)
    a = gaussian_filter(_rgb_at(parent, size), sigma=(BLUR_SIGMA, BLUR_SIGMA, 0))
    b = gaussian_filter(_rgb_at(child, size), sigma=(BLUR_SIGMA, BLUR_SIGMA, 0))
    diff = np.abs(a - b)
    changed = diff.max(axis=2) > PIXEL_THRESHOLD
    if use_segmentation:
        mask, how = person_mask(parent, size)
    else:
        mask, how = centre_prior(size[1], size[0]), "centre_prior"
    subject = float(changed[mask].mean()) if mask.any() else 0.0
    background = float(changed[~mask].mean()) if (~mask).any() else 0.0
    return ChangeMeasure(
        changed_fraction=float(changed.mean()),
        mean_abs_diff=float(diff.mean()),
        subject_changed_fraction=subject,
        background_changed_fraction=background,
        subject_area=float(mask.mean()),
        mask=how,
        size_changed=parent.size != child.size,
    )
