"""Person segmentation with mediapipe's selfie segmenter (weights ship inside mediapipe 0.10.21).

One cached segmenter per model for the whole process, shared by the composite editor (cut-outs) and the
judge's change signal (subject vs background), created with mediapipe's native start-up chatter hidden.

The segmenter only knows people. On anything else (a cat, a mascot, a coffee cup) it still answers, with
a mask that covers almost the whole frame, or a soft grey blob, or scattered bits; ``mask_quality``
measures those failure shapes so a composite built on such a mask is reported instead of passed off as
an edit. Measured on the sample photos and scikit-image's test images (P = the segmenter's per-pixel
probability; "uncertain" = 0.2 < P < 0.8, relative to the covered area):

| image | coverage | uncertain | largest part |
|---|---|---|---|
| astronaut and the 5 demo crops of it | 0.52 - 0.57 | 0.02 - 0.21 | 0.99 - 1.00 |
| cameraman (a person, busy edges) | 0.33 | 0.16 | 0.99 |
| chelsea (a cat, close up) | **0.91** | 0.15 | 1.00 |
| coffee cup | 0.22 | **0.75** | 0.99 |
| immunohistochemistry slide | 0.36 | **1.01** | 0.99 |
| Hubble deep field | 0.04 | **2.6** | **0.70** |
| brick wall, rocket | **0.00** | - | - |
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from flywheel.errors import MissingExtraError


@functools.lru_cache(maxsize=2)
def selfie_segmenter(model_selection: int = 0):
    """mediapipe SelfieSegmentation (0: general 256x256, 1: landscape 144x256); MissingExtraError without it."""
    try:
        import mediapipe as mp
    except ImportError as err:
        raise MissingExtraError("mediapipe", "composite", "Person segmentation") from err
    import numpy as np

    with native_output_silenced():
        segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=model_selection)
        segmenter.process(np.zeros((64, 64, 3), np.uint8))  # the first call logs too
    return segmenter


SCORER = "mask:mediapipe_selfie"  # the score row an edit's mask report becomes (criterion edit_applied)

# A person cut-out that can be trusted: covers a sensible share of the frame, mostly with confident pixels,
# in one piece. Thresholds sit between the people and the non-people in the table above.
MIN_COVERAGE = 0.03
MAX_COVERAGE = 0.85  # more than this and there is no background left to replace: not a person in a scene
MAX_UNCERTAIN = 0.5
MIN_LARGEST_PART = 0.8


@dataclass(frozen=True)
class MaskQuality:
    """How trustworthy a selfie-segmentation mask is; ``problem`` says why not (None: usable)."""

    coverage: float  # share of the frame with P(person) > 0.5
    uncertain: float  # pixels with 0.2 < P < 0.8, as a share of the covered area
    largest_part: float  # share of the covered area in its largest connected part
    parts: int  # connected parts larger than 1% of the frame
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "segmenter": "mediapipe_selfie"}


def mask_quality(prob) -> MaskQuality:
    """Measure a person-probability mask (HxW floats in [0, 1]) for the failure shapes described above."""
    import cv2
    import numpy as np

    prob = np.asarray(prob, dtype=np.float32)
    covered = prob > 0.5
    n = int(covered.sum())
    coverage = n / covered.size
    uncertain = float(((prob > 0.2) & (prob < 0.8)).sum()) / max(n, 1)
    parts, largest = 0, 0.0
    if n:
        _, _, stats, _ = cv2.connectedComponentsWithStats(covered.astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        largest = float(areas.max()) / n
        parts = int((areas > 0.01 * covered.size).sum())
    problems = []
    if coverage < MIN_COVERAGE:
        problems.append(f"covers {coverage:.0%} of the frame (< {MIN_COVERAGE:.0%}): no person found")
    elif coverage > MAX_COVERAGE:
        problems.append(f"covers {coverage:.0%} of the frame (> {MAX_COVERAGE:.0%}): no person separable "
                        "from a background")
    if n and uncertain > MAX_UNCERTAIN:
        problems.append(f"low confidence: {uncertain:.0%} of it is uncertain (> {MAX_UNCERTAIN:.0%})")
    if n and largest < MIN_LARGEST_PART:
        problems.append(f"fragmented: its largest part holds {largest:.0%} (< {MIN_LARGEST_PART:.0%})")
    problem = "subject mask failed: " + ", ".join(problems) if problems else None
    return MaskQuality(round(coverage, 4), round(uncertain, 4), round(largest, 4), parts, problem)


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Hide the TFLite/absl lines mediapipe's C++ prints on first use (they break progress bars).

    They go through C stdio, so the C buffers are flushed before the real fds 1 and 2 come back.
    """
    import ctypes

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as null:
            for fd in saved:
                os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def record_mask_report(catalog, image_id: int, image, op_id: int) -> bool | None:
    """Store the composite editor's mask report (``image.info["subject_mask"]``) as a score row.

    Returns whether the mask was usable (None: the edit did not use a mask). The judge reads the row and
    rejects an edit whose mask failed; the score itself decides nothing.
    """
    import json

    report = getattr(image, "info", {}).get("subject_mask")
    if not report:
        return None
    catalog.insert("scores", {"image_id": image_id, "criterion": "edit_applied", "scorer": SCORER,
                              "value": report["coverage"], "details_json": json.dumps(report, sort_keys=True),
                              "operation_id": op_id})
    return bool(report["ok"])
