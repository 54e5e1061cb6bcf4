"""Face detection and 128-d face identity embeddings with dlib (weights from ``face_recognition_models``).

Real models that ship inside PyPI packages, so they work offline. The maths follows dlib's
``face_recognition_model_v1``: Euclidean distance < 0.6 between two embeddings means "same person" on
LFW. Install with the ``face`` extra; ``available()`` says whether it is installed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flywheel.errors import MissingExtraError

log = logging.getLogger(__name__)

DETECTOR = "dlib_hog"
EMBEDDER = "dlib_resnet_v1"
SAME_PERSON_DISTANCE = 0.6  # dlib's documented threshold for its ResNet embedding


@dataclass(frozen=True)
class FaceBox:
    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)


def available() -> bool:
    try:
        _models()
    except MissingExtraError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _models():
    try:
        import warnings

        import dlib
        with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import face_recognition_models as frm
    except ImportError as err:
        raise MissingExtraError(err.name or "dlib", "face", "Face detection and identity") from err
    detector = dlib.get_frontal_face_detector()
    shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    encoder = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    return detector, shape, encoder


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def detect_faces(image: Image.Image, *, upsample: int = 1, min_score: float = 0.0) -> list[FaceBox]:
    """Faces found by dlib's HOG detector, largest first (boxes clipped to the image)."""
    detector, _, _ = _models()
    arr = _rgb_array(image)
    h, w = arr.shape[:2]
    rects, scores, _ = detector.run(arr, upsample, min_score)
    boxes = [
        FaceBox(max(0, r.left()), max(0, r.top()), min(w, r.right()), min(h, r.bottom()), float(s))
        for r, s in zip(rects, scores)
    ]
    return sorted(boxes, key=lambda b: b.area, reverse=True)


def embed_faces(image: Image.Image, boxes: list[FaceBox]) -> list[np.ndarray]:
    """128-d identity embeddings (float32), one per box."""
    import dlib

    _, shape, encoder = _models()
    arr = _rgb_array(image)
    out = []
    for b in boxes:
        landmarks = shape(arr, dlib.rectangle(b.left, b.top, b.right, b.bottom))
        out.append(np.asarray(encoder.compute_face_descriptor(arr, landmarks, 1), dtype=np.float32))
    return out


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))
