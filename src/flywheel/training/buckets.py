"""Aspect-ratio buckets: every image trains at about ``resolution``² pixels in the shape closest to its own.

Buckets are (width, height) pairs, multiples of ``step`` (FLUX needs multiples of 16: VAE /8, then 2x2
patches), with an area of at most ``resolution``². An image is scaled down so that it covers its bucket
and centre-cropped. It is never scaled up: an image too small for its bucket gets a smaller bucket of the
same shape (its own size, rounded down to a multiple of 16), and a warning says so.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

from PIL import Image

from flywheel.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class Assignment:
    bucket: Bucket
    downsized: bool  # True: the image was too small for the full-size bucket of its shape


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[Bucket]:
    """The largest bucket of each width (multiple of ``step``) within the area and aspect limits."""
    if step % 16 or resolution % 16:
        raise ConfigError(f"train.bucket_step ({step}) and train.resolution ({resolution}) must be multiples of 16",
                          hint="FLUX latents are 1/8 of the image and packed in 2x2 patches: use e.g. 64 and 1024")
    area = resolution * resolution
    buckets = set()
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            buckets.add(Bucket(w, h))
            buckets.add(Bucket(h, w))
        w += step
    return sorted(buckets, key=lambda b: (b.aspect, b.width))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Assignment:
    """The bucket whose shape is closest to the image's (in log aspect), shrunk if the image is too small."""
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.aspect) - ratio), -b.width * b.height))
    scale = max(best.width / width, best.height / height)  # to cover the bucket
    if scale <= 1.0:
        return Assignment(best, downsized=False)
    small = Bucket(max(16, int(best.width / scale) // 16 * 16), max(16, int(best.height / scale) // 16 * 16))
    return Assignment(small, downsized=True)


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale down (never up) to cover the bucket, then centre-crop to exactly the bucket's size."""
    scale = max(bucket.width / image.width, bucket.height / image.height)
    if scale > 1.0 + 1e-9:
        raise ValueError(f"image {image.size} is smaller than bucket {bucket}; assign_bucket never does this")
    w, h = max(bucket.width, round(image.width * scale)), max(bucket.height, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - bucket.width) // 2, (h - bucket.height) // 2
    return image.crop((left, top, left + bucket.width, top + bucket.height))


def group_by_bucket(sizes: dict[int, tuple[int, int]], buckets: list[Bucket]) -> dict[Bucket, list[int]]:
    """Image id -> bucket, grouped; logs each image that got a smaller bucket than its shape's full size."""
    groups: dict[Bucket, list[int]] = defaultdict(list)
    for image_id, (w, h) in sizes.items():
        a = assign_bucket(w, h, buckets)
        if a.downsized:
            log.warning("image %d (%dx%d) is smaller than its bucket: training it at %dx%d, not upscaled",
                        image_id, w, h, a.bucket.width, a.bucket.height)
        groups[a.bucket].append(image_id)
    return dict(groups)
