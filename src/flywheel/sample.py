"""The built-in sample character: five different shots derived from one real photograph.

The photo is ``skimage.data.astronaut()`` (NASA portrait of astronaut Eileen Collins, public domain),
shipped inside scikit-image, so the demo and the tests have real pixels and a real face offline. Five
crops/flips/rotations of one photo are exactly the "five look-alike images" problem Flywheel exists to
fix: same background, same lighting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SAMPLE_NAME = "Astronaut"
SAMPLE_TRIGGER = "fw_astro"


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).convert("RGB")


def sample_images() -> list[tuple[str, Image.Image]]:
    """(file name, image) pairs; deterministic. Each has a detectable face and differs in framing."""
    full = astronaut()  # 512x512, face at about (175,76)-(265,166)
    portrait = full.crop((60, 0, 380, 320)).resize((384, 384), Image.Resampling.LANCZOS)
    mirrored = full.crop((20, 10, 470, 460)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tilted = full.rotate(9, resample=Image.Resampling.BICUBIC, center=(220, 121)).crop((40, 30, 440, 430))
    warm_arr = np.asarray(full.crop((0, 40, 420, 512)), dtype=np.float32) * np.array([1.08, 1.0, 0.88])
    warm = ImageEnhance.Contrast(Image.fromarray(np.clip(warm_arr, 0, 255).astype(np.uint8))).enhance(1.1)
    return [
        ("astronaut_full.png", full),
        ("astronaut_portrait.png", portrait),
        ("astronaut_mirrored.png", mirrored),
        ("astronaut_tilted.png", tilted),
        ("astronaut_warm.jpg", warm),
    ]


def write_sample(folder: Path) -> list[Path]:
    """Write the sample images into ``folder`` (idempotent: existing files are left as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_images():
        path = folder / name
        if not path.exists():
            image.save(path, quality=92) if name.endswith(".jpg") else image.save(path)
        paths.append(path)
    return paths
