"""The composite editor: identity-preserving edits on CPU with real offline models, no generative model.

It is the offline demo's editor and a fallback for users without a big GPU. It cannot read prompts, so
it applies the recipe's ``composite`` spec (``flywheel.recipes``):

- background: mediapipe selfie segmentation (real weights shipped in the wheel) cuts the person out
  with a feathered mask; the subject's LAB mean and spread move part of the way toward the scene right
  around it (``harmonize``), the scene's light wraps its edge, and it is placed on a procedural scene
  (``composite_scenes``);
- lighting: LAB colour transfer toward a tint, contrast/saturation, a directional colour gradient, a
  rim light along the subject's edge on the light's side, a vignette;
- style: OpenCV filter chains (edge-preserving smoothing, stylization, pencil sketch, k-means cel
  quantisation with ink lines, halftone);
- camera: a perspective warp (yaw/pitch/roll) plus zoom about the face (OpenCV Haar cascade) or the
  subject; a 2D approximation of a viewpoint change, not a new view.

The subject's own pixels are only recoloured or filtered, never redrawn, so its face stays recognisable.
Every random choice (scene layout, small parameter jitter) comes from the request's seed.

The segmenter only knows people. Every edit whose result depends on the mask (a background, a rim light)
measures it (``signals.segmentation.mask_quality``) and reports it on the output image as
``image.info["subject_mask"]``; enrich records it as a score and the judge rejects an edit whose mask
failed ("subject mask failed: ..."), so a half-masked cat on a forest is never passed off as an edit.
A rim light is left out rather than drawn along a failed mask's edge; a camera focus falls back to the
frame centre.
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
from flywheel.models.composite_camera import camera_matrix, cover
from flywheel.models.composite_scenes import draw_scene
from flywheel.models.composite_styles import stylize
from flywheel.recipes import BackgroundSpec, CameraSpec, LightingSpec, Recipe, StyleSpec
from flywheel.signals.segmentation import MaskQuality, mask_quality, selfie_segmenter

log = logging.getLogger(__name__)

VERSION = 2  # bump when outputs change for the same inputs, so recorded params tell results apart
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
        quality: MaskQuality | None = None  # set by the edits whose result depends on the person mask
        if isinstance(spec, BackgroundSpec):
            out, quality = self._background(rgb, spec, rng, recipe)
        elif isinstance(spec, LightingSpec):
            out, quality = self._lighting(rgb, spec, rng)
        elif isinstance(spec, StyleSpec):
            out = stylize(rgb, spec, rng)
        elif isinstance(spec, CameraSpec):
            out = self._camera(rgb, spec, rng)
        else:  # pragma: no cover - the Recipe schema admits only the four specs
            raise TypeError(type(spec))
        image = Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if quality is not None:
            image.info["subject_mask"] = quality.as_dict()
            if not quality.ok:
                log.warning("composite: %s: %s", recipe.id, quality.problem)
        return image

    # -- segmentation ---------------------------------------------------------------------------------
    def subject_mask(self, rgb: np.ndarray) -> np.ndarray:
        """Feathered person mask in [0, 1] (float32, HxW) from mediapipe selfie segmentation."""
        return self.measured_mask(rgb)[0]

    def measured_mask(self, rgb: np.ndarray) -> tuple[np.ndarray, MaskQuality]:
        """(feathered person mask, how trustworthy the segmenter's answer is)."""
        if self._segmenter is None:
            self._segmenter = selfie_segmenter(self.segmentation_model)
        u8 = np.ascontiguousarray((rgb * 255).astype(np.uint8))
        raw = self._segmenter.process(u8).segmentation_mask.astype(np.float32)
        return self._feather(raw), mask_quality(raw)

    @staticmethod
    def _feather(raw: np.ndarray) -> np.ndarray:
        s = max(raw.shape[:2]) / 512
        alpha = np.clip((raw - 0.35) / 0.3, 0.0, 1.0)  # a soft threshold keeps hair edges partial
        # Pull the edge in a little before feathering, so no rim of the old background survives.
        k = max(1, int(round(2 * s)))
        alpha = cv2.erode(alpha, np.ones((2 * k + 1, 2 * k + 1), np.uint8))
        return cv2.GaussianBlur(alpha, (0, 0), 1.2 * s)

    def _require_subject(self, rgb: np.ndarray, what: str) -> tuple[np.ndarray, MaskQuality]:
        alpha, quality = self.measured_mask(rgb)
        if float(alpha.mean()) < MIN_SUBJECT_FRACTION:
            raise ModelOutputError(
                f"the composite editor found no person to {what} (selfie segmentation covers "
                f"{alpha.mean():.1%} of the image)",
                hint="person segmentation only finds people; for other characters use a generative backend "
                "([enrich] backend = \"qwen-image-edit\") or leave background recipes out",
            )
        return alpha, quality

    # -- background -----------------------------------------------------------------------------------
    def _background(self, rgb: np.ndarray, spec: BackgroundSpec, rng: np.random.Generator,
                    recipe: Recipe) -> tuple[np.ndarray, MaskQuality]:
        alpha, quality = self._require_subject(rgb, f"place on the '{recipe.id}' background")
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
        return subject * a + scene * (1 - a), quality

    # -- lighting -------------------------------------------------------------------------------------
    def _lighting(self, rgb: np.ndarray, spec: LightingSpec,
                  rng: np.random.Generator) -> tuple[np.ndarray, MaskQuality | None]:
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
        quality = None
        if spec.rim is not None and spec.rim_strength > 0:
            alpha, quality = self.measured_mask(rgb)
            if not quality.ok:  # a rim along a wrong edge is worse than none; the report says it is missing
                log.info("composite: the rim light is left out of this lighting edit (%s)", quality.problem)
            else:
                out = _screen(out, _rim(alpha, spec.rim_angle, 7 * s)[..., None] * spec.rim_strength
                              * (np.array(spec.rim, np.float32) / 255))
        if spec.vignette > 0:
            ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
            r2 = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2
            out = out * (1 - spec.vignette * np.clip(r2 / 2, 0, 1))[..., None]
        return np.clip(out, 0, 1), quality

    # -- camera ---------------------------------------------------------------------------------------
    def _camera(self, rgb: np.ndarray, spec: CameraSpec, rng: np.random.Generator) -> np.ndarray:
        h, w = rgb.shape[:2]
        focus = self._focus(rgb, spec.focus)
        yaw, pitch = spec.yaw + rng.uniform(-1.5, 1.5), spec.pitch + rng.uniform(-1.0, 1.0)
        zoom = spec.zoom * rng.uniform(0.98, 1.02)
        M = camera_matrix(w, h, yaw, pitch, spec.roll, zoom, focus)
        if zoom >= 1.0:
            M = cover(M, w, h)  # zoom a touch further rather than show pixels that do not exist
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
            alpha, quality = self.measured_mask(rgb)
            if quality.ok:  # a failed mask's centroid is anywhere: the frame centre is the honest guess
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


# Per LAB channel: (how far the mean moves, how far the spread moves, the spread ratio's bounds). Lightness
# moves least, so a face stays readable on a dark scene; colour follows the scene more.
_HARMONY = ((0, 0.5, 0.5, (0.75, 1.25)), (1, 1.0, 0.5, (0.6, 1.4)), (2, 1.0, 0.5, (0.6, 1.4)))
NEAR_FRACTION = 0.12  # "near the subject": background within 12% of the long side of its edge


def harmonize(rgb: np.ndarray, scene: np.ndarray, alpha: np.ndarray, strength: float) -> np.ndarray:
    """Move the subject's colour and light part of the way toward the scene right around it.

    Reinhard-style transfer in LAB: per channel, the subject's mean moves toward the mean of the scene
    in a band around the subject (that light is what falls on it in a photo; a bright sky far above
    should not brighten a face), and its spread toward the band's, both scaled by ``strength`` (0-1).
    """
    if strength <= 0:
        return rgb
    lab, scene_lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), cv2.cvtColor(scene, cv2.COLOR_RGB2LAB)
    inside = alpha > 0.5
    if not inside.any():
        return rgb
    distance = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, 5)  # px to the subject
    near = (distance > 0) & (distance <= NEAR_FRACTION * max(alpha.shape))
    if near.sum() < 0.01 * near.size:  # the subject fills the frame: use whatever scene there is
        near = ~inside
    if not near.any():
        return rgb
    w = alpha / (alpha.sum() + 1e-6)
    for c, k_mean, k_std, (lo, hi) in _HARMONY:
        x = lab[..., c]
        mu_s = float((x * w).sum())
        sd_s = float(np.sqrt(((x - mu_s) ** 2 * w).sum()))
        band = scene_lab[..., c][near]
        mu_b, sd_b = float(band.mean()), float(band.std())
        ratio = float(np.clip(sd_b / sd_s, lo, hi)) ** (strength * k_std) if sd_s > 1e-3 else 1.0
        lab[..., c] = (x - mu_s) * ratio + mu_s + (mu_b - mu_s) * strength * k_mean
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
