"""What an image shows, for coverage: view angle and framing from dlib's 5-point face landmarks.

Works without a VLM. The 5-point model (``face_recognition_models``) gives two corners per eye and the
base of the nose. Turning the head moves the nose off the line between the eyes' centres: the offset,
measured along the eye line and divided by the distance between the eyes, is ~0 facing the camera and
grows as tan(yaw) (~0.15 at 15 degrees, ~0.35 at 30, ~1 at 60). Framing is the face box's height as a
share of the image height (a close-up is mostly face; in a full-body shot the face is a small part).

No face means no landmark tags: a back view and a missed detection look the same to dlib, so nothing is
guessed (the VLM's answers, when asked, cover those).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Fixed answer sets per axis (the VLM chooses among the same tags; flywheel.coverage).
VIEWS = ("frontal", "three-quarter", "profile", "back")
FRAMINGS = ("close-up", "portrait", "half body", "full body")
FRONTAL_MAX_TURN = 0.15  # nose offset / eye distance: below this the face looks at the camera (< ~15 degrees)
PROFILE_MIN_TURN = 0.8  # from here the far eye is nearly hidden (> ~55 degrees)
# Face-box height / image height: at least this much for each framing, largest first.
FRAMING_MIN_FACE = (("close-up", 0.4), ("portrait", 0.2), ("half body", 0.1), ("full body", 0.0))


@dataclass(frozen=True)
class LandmarkTags:
    view: str
    framing: str
    turn: float  # signed nose offset along the eye line / eye distance
    face_height: float  # face box height / image height

    def as_dict(self) -> dict:
        return {"view": self.view, "framing": self.framing, "turn": round(self.turn, 4),
                "face_height": round(self.face_height, 4)}


def view_from_turn(turn: float) -> str:
    t = abs(turn)
    return "frontal" if t < FRONTAL_MAX_TURN else "three-quarter" if t < PROFILE_MIN_TURN else "profile"


def framing_from_face(face_height: float) -> str:
    return next(name for name, floor in FRAMING_MIN_FACE if face_height >= floor)


def landmark_tags(image: Image.Image, box) -> LandmarkTags:
    """Tags from the face in ``box`` (a ``signals.faces.FaceBox``, e.g. the largest face dlib found)."""
    import dlib

    from flywheel.signals.faces import _models, _rgb_array

    _, shape, _ = _models()
    arr = _rgb_array(image)
    points = shape(arr, dlib.rectangle(box.left, box.top, box.right, box.bottom))
    p = np.array([[points.part(i).x, points.part(i).y] for i in range(5)], dtype=np.float64)
    eye_a, eye_b, nose = p[0:2].mean(axis=0), p[2:4].mean(axis=0), p[4]
    axis = eye_b - eye_a
    distance = float(np.linalg.norm(axis)) or 1.0
    turn = float(np.dot(nose - (eye_a + eye_b) / 2, axis / distance) / distance)
    face_height = (box.bottom - box.top) / image.height
    return LandmarkTags(view_from_turn(turn), framing_from_face(face_height), turn, face_height)
