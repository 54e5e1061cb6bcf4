"""Too close to a source: is a candidate a near copy (or a mirrored copy) of one of the sources?

The judge's other identity checks only ask "too far?". An edit that hands back the source (re-encoded,
a little noise, or flipped) passes them with the best scores, and a LoRA trained on such copies
memorises the sources instead of learning the character (WithAnyone, ICLR'26, calls it copy-paste).

Two measurements per source, at one small working size so that re-encoding and resampling do not count:

- structure: SSIM of the grey images (``skimage.metrics.structural_similarity``), against the source and
  against the source mirrored left-right; 1.0 is identical layout and texture;
- colour: the median CIE76 colour difference (Delta E, LAB) against the same (possibly mirrored) source.
  SSIM alone cannot tell a relight from a copy (a warm golden-hour grade keeps SSIM ~0.96), but it moves
  every pixel's colour by ~10 Delta E, while a re-encoded copy stays near 1 (2.3 is one just-noticeable step).

The nearest source is the one with the highest SSIM (either orientation). Whether that is a copy is the
policy's business (``[judge] max_copy_similarity``, ``max_copy_color_difference``, ``min_face_distance_copy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

WORK_SIDE = 128  # square working size: layouts are compared, not the last pixel of detail


@dataclass(frozen=True)
class CopyMeasure:
    source_id: int  # the nearest source by structure
    mirrored: bool  # True when the mirrored source is the closer match
    ssim: float  # structure similarity to that source (in that orientation), -1..1
    ssim_straight: float
    ssim_mirrored: float
    color_difference: float  # median Delta E (CIE76) to that source in that orientation

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Prepared:
    grey: np.ndarray
    lab: np.ndarray


def _prepare(image: Image.Image) -> _Prepared:
    from skimage.color import rgb2lab

    rgb = np.asarray(image.convert("RGB").resize((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX),
                     dtype=np.float32) / 255.0
    grey = np.asarray(image.convert("L").resize((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX),
                      dtype=np.float32) / 255.0
    return _Prepared(grey=grey, lab=rgb2lab(rgb))


class SourceCopies:
    """The sources (and their mirror images) prepared once; ``nearest`` measures one candidate against them."""

    def __init__(self, sources: list[tuple[int, Image.Image]]):
        self.sources = [(sid, _prepare(im), _prepare(ImageOps.mirror(im.convert("RGB")))) for sid, im in sources]

    def nearest(self, image: Image.Image) -> CopyMeasure | None:
        """The nearest source by structure, or None when there are no sources."""
        from skimage.metrics import structural_similarity

        if not self.sources:
            return None
        cand = _prepare(image)
        best: CopyMeasure | None = None
        for sid, straight, mirrored in self.sources:
            s0 = float(structural_similarity(cand.grey, straight.grey, data_range=1.0))
            s1 = float(structural_similarity(cand.grey, mirrored.grey, data_range=1.0))
            flip = s1 > s0
            ref = mirrored if flip else straight
            delta_e = float(np.median(np.linalg.norm(cand.lab - ref.lab, axis=2)))
            m = CopyMeasure(sid, flip, max(s0, s1), s0, s1, delta_e)
            if best is None or m.ssim > best.ssim:
                best = m
        return best
