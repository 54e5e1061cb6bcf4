"""The composite editor: identity-preserving edits on CPU with real offline models, no generative model.

It is the offline demo's editor and a fallback for users without a big GPU. It cannot read prompts, so
it applies the recipe's ``composite`` spec (``flywheel.recipes``):

- background: mediapipe selfie segmentation (real weights shipped in the wheel) cuts the person out
  with a feathered mask; the subject is colour-harmonised toward, light-wrapped by and placed on a
  procedural scene (``composite_scenes``);
- lighting: LAB colour transfer toward a tint, contrast/saturation, a directional colour gradient, a
  rim light along the subject's edge on the light's side, a vignette;
- style: OpenCV filter chains (edge-preserving smoothing, stylization, pencil sketch, k-means cel
  quantisation with ink lines, halftone);
- camera: a perspective warp (yaw/pitch/roll) plus zoom about the face (OpenCV Haar cascade) or the
  subject; a 2D approximation of a viewpoint change, not a new view.

The subject's own pixels are only recoloured or filtered, never redrawn, so its face stays recognisable.
Every random choice (scene layout, small parameter jitter) comes from the request's seed.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import cv2
import numpy as np
from PIL import Image

from flywheel.errors import ModelOutputError, StageError
from flywheel.models.base import EditRequest
from flywheel.models.composite_scenes import draw_scene
from flywheel.models.composite_styles import stylize
from flywheel.recipes import BackgroundSpec, CameraSpec, LightingSpec, Recipe, StyleSpec
from flywheel.signals.segmentation import selfie_segmenter

log = logging.getLogger(__name__)

VERSION = 1  # bump when outputs change for the same inputs, so recorded params tell results apart
MIN_SUBJECT_FRACTION = 0.01


class CompositeEditor:
    """``ImageEditor`` for the CPU composite backend (see module docstring)."""

    model_id = "composite"
    max_references = 0  # it edits one image; extra references would not be used, so none are recorded

    def __init__(self, *, segmentation_model: int = 0):
        self.segmentation_model = segmentation_model  # 0: general (256x256), 1: landscape (144x256)
        self._segmenter: Any = None
        self._faces: Any = None

    def params(self) -> dict[str, Any]:
        return {
            "backend": "composite", "version": VERSION, "opencv": cv2.__version__,
            "segmenter": f"mediapipe selfie_segmentation model {self.segmentation_model}",
        }

    def edit(self, requests: list[EditRequest]) -> list[Image.Image]:
        return [self._edit_one(r) for r in requests]

    def close(self) -> None:
        # The segmenter is the process-wide one (flywheel.signals.segmentation), shared with the judge's
        # change signal: drop the reference, never close it.
        self._segmenter = None

    # -- one request --------------------------------------------------------------------------------
    def _edit_one(self, request: EditRequest) -> Image.Image:
        recipe = request.recipe
        if recipe is None:
            raise StageError(
                "the composite editor needs the recipe (EditRequest.recipe), it cannot follow a free-text prompt",
                hint="run edits through `flywheel enrich`, which passes each recipe, or use a generative backend",
            )
        # One generator per (seed, recipe): seeds vary an edit, and recipes with the same seed differ.
        rng = np.random.default_rng([request.seed, zlib.crc32(recipe.id.encode())])
        rgb = np.asarray(request.image.convert("RGB"), dtype=np.float32) / 255.0
        spec = recipe.composite
        if isinstance(spec, BackgroundSpec):
            out = self._background(rgb, spec, rng, recipe)
        elif isinstance(spec, LightingSpec):
            out = self._lighting(rgb, spec, rng)
        elif isinstance(spec, StyleSpec):
            out = stylize(rgb, spec, rng)
        elif isinstance(spec, CameraSpec):
            out = self._camera(rgb, spec, rng)
        else:  # pragma: no cover - the Recipe schema admits only the four specs
            raise TypeError(type(spec))
        return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))

    # -- segmentation ---------------------------------------------------------------------------------
    def subject_mask(self, rgb: np.ndarray) -> np.ndarray:
        """Feathered person mask in [0, 1] (float32, HxW) from mediapipe selfie segmentation."""
        if self._segmenter is None:
            self._segmenter = selfie_segmenter(self.segmentation_model)
        u8 = np.ascontiguousarray((rgb * 255).astype(np.uint8))
        raw = self._segmenter.process(u8).segmentation_mask.astype(np.float32)
        s = max(rgb.shape[:2]) / 512
        alpha = np.clip((raw - 0.35) / 0.3, 0.0, 1.0)  # a soft threshold keeps hair edges partial
        # Pull the edge in a little before feathering, so no rim of the old background survives.
        k = max(1, int(round(2 * s)))
        alpha = cv2.erode(alpha, np.ones((2 * k + 1, 2 * k + 1), np.uint8))
        return cv2.GaussianBlur(alpha, (0, 0), 1.2 * s)

    def _require_subject(self, rgb: np.ndarray, what: str) -> np.ndarray:
        alpha = self.subject_mask(rgb)
        if float(alpha.mean()) < MIN_SUBJECT_FRACTION:
            raise ModelOutputError(
                f"the composite editor found no person to {what} (selfie segmentation covers "
                f"{alpha.mean():.1%} of the image)",
                hint="person segmentation only finds people; for other characters use a generative backend "
                "([enrich] backend = \"qwen-image-edit\") or leave background recipes out",
            )
        return alpha

    # -- background -----------------------------------------------------------------------------------
    def _background(self, rgb: np.ndarray, spec: BackgroundSpec, rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
        alpha = self._require_subject(rgb, f"place on the '{recipe.id}' background")
        h, w = rgb.shape[:2]
        s = max(h, w) / 512
        scene = draw_scene(spec.scene, h, w, int(rng.integers(2**31)), [tuple(c) for c in spec.colors] or None)
        if spec.blur > 0:
            scene = cv2.GaussianBlur(scene, (0, 0), spec.blur * s)
        subject = harmonize(rgb, scene, alpha, spec.harmonize)
        # Light wrap: the scene's colour bleeds a little over the subject's edge, as it does in a photo.
        inv = 1.0 - alpha
        wrap = cv2.GaussianBlur(scene * inv[..., None], (0, 0), 6 * s) / (cv2.GaussianBlur(inv, (0, 0), 6 * s)[..., None] + 1e-4)
        edge = (alpha * cv2.GaussianBlur(inv, (0, 0), 4 * s))[..., None]
        subject = subject * (1 - 0.6 * edge) + wrap * 0.6 * edge
        a = alpha[..., None]
        return subject * a + scene * (1 - a)

    # -- lighting -------------------------------------------------------------------------------------
    def _lighting(self, rgb: np.ndarray, spec: LightingSpec, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        s = max(h, w) / 512
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        L, A, B = lab[..., 0], lab[..., 1], lab[..., 2]
        if spec.tint_strength > 0:  # Reinhard-style transfer of the chroma means toward the tint
            t = cv2.cvtColor(np.array([[spec.tint]], np.float32) / 255, cv2.COLOR_RGB2LAB)[0, 0]
            A += spec.tint_strength * (t[1] - A.mean())
            B += spec.tint_strength * (t[2] - B.mean())
        mean_l = L.mean()
        L[:] = (mean_l + (L - mean_l) * spec.contrast) * spec.brightness
        A *= spec.saturation
        B *= spec.saturation
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        if spec.gradient and spec.gradient_strength > 0:
            angle = np.deg2rad(spec.gradient_angle + rng.uniform(-8, 8))
            ramp = _ramp(h, w, angle)[..., None]  # 0 on the light's side, 1 on the far side
            light, far = (np.array(c, np.float32) / 255 for c in spec.gradient)
            colour = light * (1 - ramp) + far * ramp
            g = spec.gradient_strength * rng.uniform(0.9, 1.1)
            out = out * ((1 - g) + g * 1.5 * colour)
        if spec.rim is not None and spec.rim_strength > 0:
            alpha = self.subject_mask(rgb)
            if alpha.mean() < MIN_SUBJECT_FRACTION:
                log.warning("composite: no person found, so the rim light is left out of this lighting edit")
            else:
                out = _screen(out, _rim(alpha, spec.rim_angle, 7 * s)[..., None] * spec.rim_strength
                              * (np.array(spec.rim, np.float32) / 255))
        if spec.vignette > 0:
            ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
            r2 = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2
            out = out * (1 - spec.vignette * np.clip(r2 / 2, 0, 1))[..., None]
        return np.clip(out, 0, 1)

    # -- camera ---------------------------------------------------------------------------------------
    def _camera(self, rgb: np.ndarray, spec: CameraSpec, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        focus = self._focus(rgb, spec.focus)
        yaw, pitch = spec.yaw + rng.uniform(-1.5, 1.5), spec.pitch + rng.uniform(-1.0, 1.0)
        zoom = spec.zoom * rng.uniform(0.98, 1.02)
        M = _camera_matrix(w, h, yaw, pitch, spec.roll, zoom, focus)
        if zoom >= 1.0:
            M = _cover(M, w, h)  # zoom a touch further rather than show pixels that do not exist
            out = cv2.warpPerspective(rgb, M, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)
        else:
            # Wider than the photo: extend it with a heavily blurred mirror, the honest 2D answer.
            out = cv2.warpPerspective(rgb, M, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)
            valid = cv2.warpPerspective(np.ones((h, w), np.float32), M, (w, h), flags=cv2.INTER_LINEAR)
            s = max(h, w) / 512
            fill = cv2.GaussianBlur(out, (0, 0), 18 * s) * 0.8
            band = max(3, int(8 * s) | 1)  # fade the photo's own edge into the margin, no hard frame
            valid = cv2.GaussianBlur(cv2.erode(valid, np.ones((band, band), np.uint8)), (0, 0), 4 * s)[..., None]
            out = out * valid + fill * (1 - valid)
        out = np.clip(out, 0, 1)
        return out[:, ::-1] if spec.flip else out

    def _focus(self, rgb: np.ndarray, focus: str) -> tuple[float, float]:
        h, w = rgb.shape[:2]
        if focus == "face":
            face = self._largest_face(rgb)
            if face is not None:
                return face
        if focus in ("face", "subject"):
            alpha = self.subject_mask(rgb)
            if alpha.mean() >= MIN_SUBJECT_FRACTION:
                ys, xs = np.nonzero(alpha > 0.5)
                top = ys.min()  # no face found: the head is near the top of the person
                y = top + 0.15 * (ys.max() - top) if focus == "face" else ys.mean()
                return float(xs.mean()), float(y)
        return w / 2, h / 2

    def _largest_face(self, rgb: np.ndarray) -> tuple[float, float] | None:
        if self._faces is None:
            self._faces = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        gray = cv2.cvtColor((rgb * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        side = min(gray.shape)
        found = self._faces.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side // 10, side // 10))
        if len(found) == 0:
            return None
        x, y, fw, fh = max(found, key=lambda b: b[2] * b[3])
        return x + fw / 2, y + fh / 2


def harmonize(rgb: np.ndarray, scene: np.ndarray, alpha: np.ndarray, strength: float) -> np.ndarray:
    """Move the subject's LAB means part of the way toward the scene's, so it sits in the scene's light."""
    if strength <= 0:
        return rgb
    lab, scene_lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), cv2.cvtColor(scene, cv2.COLOR_RGB2LAB)
    wts = alpha / (alpha.sum() + 1e-6)
    for c, k in ((0, 0.4), (1, 1.0), (2, 1.0)):  # lightness moves less than colour: faces stay readable
        delta = (scene_lab[..., c].mean() - (lab[..., c] * wts).sum()) * strength * k
        lab[..., c] += delta
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), 0, 1)


def _ramp(h: int, w: int, angle: float) -> np.ndarray:
    """0 where light at ``angle`` (0: from the left, 90: from the top) enters the frame, 1 opposite."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ux, uy = -np.cos(angle), np.sin(angle)  # the light travels in this direction (image y points down)
    proj = (xs / w - 0.5) * ux + (ys / h - 0.5) * uy
    lo, hi = proj.min(), proj.max()
    return (proj - lo) / (hi - lo + 1e-6)


def _rim(alpha: np.ndarray, angle_deg: float, width: float) -> np.ndarray:
    """Subject pixels whose neighbour toward the light is background: the edge a back light catches."""
    a = np.deg2rad(angle_deg)
    dx, dy = -np.cos(a) * width, -np.sin(a) * width  # a step toward the light source
    M = np.float32([[1, 0, dx], [0, 1, dy]])
    toward = cv2.warpAffine(alpha, M, alpha.shape[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return cv2.GaussianBlur(alpha * (1 - toward), (0, 0), width / 3)


def _screen(base: np.ndarray, light: np.ndarray) -> np.ndarray:
    return 1 - (1 - np.clip(base, 0, 1)) * (1 - np.clip(light, 0, 1))


def _camera_matrix(w: int, h: int, yaw: float, pitch: float, roll: float, zoom: float,
                   focus: tuple[float, float]) -> np.ndarray:
    """Homography: rotate the image plane in 3D (pinhole, f = 1.2 x the long side), then zoom about the focus."""
    f = 1.2 * max(w, h)
    c = np.array([w / 2, h / 2])
    K = np.array([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1]], np.float64)
    y, p, r = np.deg2rad([yaw, pitch, roll])
    Ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    Rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    H = K @ Ry @ Rx @ Rz @ np.linalg.inv(K)
    # A rotating camera also pans; keep the frame centre in place so only the perspective changes.
    mc = H @ np.array([c[0], c[1], 1.0])
    H = np.array([[1, 0, c[0] - mc[0] / mc[2]], [0, 1, c[1] - mc[1] / mc[2]], [0, 0, 1]]) @ H
    fx = H @ np.array([focus[0], focus[1], 1.0])
    fx = fx[:2] / fx[2]
    # Closer shots bring the focus toward the centre (fully by 1.5x); wider ones keep the frame centred.
    pull = np.clip((zoom - 1.0) / 0.5, 0, 1)
    anchor = fx if zoom >= 1 else c
    target = fx + (c - fx) * pull if zoom >= 1 else c
    Z = np.array([[zoom, 0, target[0] - zoom * anchor[0]], [0, zoom, target[1] - zoom * anchor[1]], [0, 0, 1]])
    return Z @ H


def _cover(M: np.ndarray, w: int, h: int) -> np.ndarray:
    """Scale ``M`` up about the frame centre just enough that every output pixel comes from the image."""
    pts = np.array([[x, y, 1.0] for x in (0, w / 2, w - 1) for y in (0, h / 2, h - 1)]).T
    c = np.array([[1, 0, w / 2], [0, 1, h / 2], [0, 0, 1]], np.float64)

    def covered(scale: float) -> bool:
        S = c @ np.diag([scale, scale, 1.0]) @ np.linalg.inv(c)
        src = np.linalg.inv(S @ M) @ pts
        src = src[:2] / src[2]
        return bool((src[0] >= -0.5).all() and (src[0] <= w - 0.5).all() and (src[1] >= -0.5).all() and (src[1] <= h - 0.5).all())

    if covered(1.0):
        return M
    lo, hi = 1.0, 3.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if covered(mid) else (mid, hi)
    S = c @ np.diag([hi, hi, 1.0]) @ np.linalg.inv(c)
    return S @ M
