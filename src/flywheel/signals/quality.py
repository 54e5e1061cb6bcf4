"""Image quality measurements from pixels: sharpness, noise and exposure (OpenCV + scikit-image, CPU).

All three are computed on a grayscale copy resized so its long side is ``WORK_SIDE`` px: the variance
of the Laplacian grows with resolution and with JPEG-scale detail, so measuring every image at one
scale keeps one threshold meaningful for a 512 px edit and a 1024 px FLUX sample alike. Values are on
a 0..1 intensity scale:

- ``sharpness``: variance of the Laplacian (3x3) of the image. Blur removes high frequencies, so a
  blurred image scores near 0; sharp photos at this scale score roughly 0.002-0.05.
- ``noise_sigma``: Gaussian noise standard deviation estimated by ``skimage.restoration.estimate_sigma``
  (wavelet MAD, Donoho): clean photos ~0.002-0.01, visibly grainy images > 0.03.
- ``exposure``: mean intensity and the fractions of nearly black / nearly white pixels.

Noise raises the Laplacian variance too, which is why the judge checks noise separately rather than
reading a high sharpness as good.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

WORK_SIDE = 512
DARK, BRIGHT = 0.02, 0.98  # intensities counted as crushed blacks / blown highlights


@dataclass(frozen=True)
class QualityMeasure:
    sharpness: float
    noise_sigma: float
    mean_intensity: float
    dark_fraction: float
    bright_fraction: float
    work_size: tuple[int, int]

    def as_dict(self) -> dict:
        return asdict(self)


def gray_at_work_scale(image: Image.Image, side: int = WORK_SIDE) -> np.ndarray:
    """Grayscale float32 in 0..1, long side resized to ``side`` (area filter when shrinking)."""
    gray = image.convert("L")
    w, h = gray.size
    scale = side / max(w, h)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = gray.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
    return np.asarray(gray, dtype=np.float32) / 255.0


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian of a 0..1 grayscale array."""
    import cv2

    return float(cv2.Laplacian(gray, cv2.CV_32F, ksize=1).var())


def noise_sigma(gray: np.ndarray) -> float:
    """Estimated Gaussian noise sigma of a 0..1 grayscale array (wavelet MAD estimator)."""
    from skimage.restoration import estimate_sigma

    if float(gray.std()) == 0.0:  # a flat image has no noise (and the wavelet estimator would divide by 0)
        return 0.0
    return float(estimate_sigma(gray.astype(np.float64), channel_axis=None))


def measure_quality(image: Image.Image) -> QualityMeasure:
    gray = gray_at_work_scale(image)
    return QualityMeasure(
        sharpness=sharpness(gray),
        noise_sigma=noise_sigma(gray),
        mean_intensity=float(gray.mean()),
        dark_fraction=float((gray <= DARK).mean()),
        bright_fraction=float((gray >= BRIGHT).mean()),
        work_size=(gray.shape[1], gray.shape[0]),
    )
