"""Art styles for the composite editor, as OpenCV filter chains on the whole image.

Each filter smooths, quantises or textures the existing pixels; none redraws the subject, so the face
stays recognisable (the tests check this with dlib's identity embedding). Small parameter jitter and
the textures come from the request's generator, so seeds give different but reproducible results.
"""

from __future__ import annotations

import cv2
import numpy as np

from flywheel.models.composite_scenes import value_noise
from flywheel.recipes import StyleSpec


def stylize(rgb: np.ndarray, spec: StyleSpec, rng: np.random.Generator) -> np.ndarray:
    """Float RGB in [0, 1] -> the same, in ``spec.filter``'s style, blended by ``spec.strength``."""
    bgr = cv2.cvtColor((np.clip(rgb, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    s = max(rgb.shape[:2]) / 512
    styled = FILTERS[spec.filter](bgr, spec, rng, s)
    out = cv2.cvtColor(styled, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    return np.clip(spec.strength * out + (1 - spec.strength) * rgb, 0, 1)


def _saturate(bgr: np.ndarray, factor: float) -> np.ndarray:
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def _multiply(bgr: np.ndarray, factor: np.ndarray) -> np.ndarray:
    f = factor if factor.ndim == 3 else factor[..., None]
    return np.clip(bgr.astype(np.float32) * f, 0, 255).astype(np.uint8)


def _strokes(h: int, w: int, rng: np.random.Generator, s: float, length: float) -> np.ndarray:
    """Brush-stroke texture in [-1, 1]: fine noise smeared along one direction per image."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    k = max(3, int(length * s) | 1)
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0 / k
    angle = rng.uniform(20, 70)
    kernel = cv2.warpAffine(kernel, cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), angle, 1.0), (k, k))
    tex = cv2.filter2D(noise, -1, kernel / max(kernel.sum(), 1e-6))
    return tex / (np.abs(tex).max() + 1e-6)


def _ink_lines(bgr: np.ndarray, s: float, block: int = 9, c: float = 5) -> np.ndarray:
    """1 where there is no line, 0 on dark outlines (adaptive threshold of a median-blurred gray)."""
    gray = cv2.medianBlur(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), 5)
    lines = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, max(3, int(block * s) | 1), c)
    return cv2.GaussianBlur(lines.astype(np.float32) / 255, (0, 0), 0.6 * s)


def _quantize(bgr: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means colour quantisation in LAB (fit on a sample of pixels, seeded)."""
    from scipy.cluster.vq import kmeans2, vq

    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB).reshape(-1, 3).astype(np.float32)
    sample = lab[rng.choice(len(lab), size=min(len(lab), 6000), replace=False)]
    centres, _ = kmeans2(sample, k, iter=15, minit="++", seed=rng)
    codes, _ = vq(lab, centres.astype(np.float32))  # nearest centre without an N x k distance matrix
    q = centres[codes].reshape(bgr.shape).astype(np.uint8)
    return cv2.cvtColor(q, cv2.COLOR_LAB2BGR)


def oil(bgr, spec, rng, s):
    smooth = cv2.edgePreservingFilter(bgr, flags=cv2.RECURS_FILTER, sigma_s=60 * rng.uniform(0.9, 1.1), sigma_r=0.5)
    detailed = cv2.detailEnhance(smooth, sigma_s=10, sigma_r=0.2)
    tex = _strokes(*bgr.shape[:2], rng, s, length=13)
    return _saturate(_multiply(detailed, 1.0 + 0.14 * tex), 1.25)


def watercolor(bgr, spec, rng, s):
    h, w = bgr.shape[:2]
    washed = cv2.edgePreservingFilter(bgr, flags=cv2.RECURS_FILTER, sigma_s=70 * rng.uniform(0.9, 1.1), sigma_r=0.6)
    washed = _saturate(cv2.addWeighted(washed, 0.8, np.full_like(washed, 255), 0.2, 0), 0.9)
    # Paper grain plus uneven pigment (low-frequency blotches).
    paper = 0.96 + 0.04 * value_noise(h, w, rng, 1.5, octaves=1) - 0.08 * value_noise(h, w, rng, 40 * s, octaves=2)
    edges = cv2.Canny(cv2.GaussianBlur(washed, (0, 0), 2.0 * s), 20, 60).astype(np.float32) / 255
    pigment = 1.0 - 0.12 * cv2.GaussianBlur(edges, (0, 0), 2.0 * s) / 0.2  # pigment pools at the wash edges
    return _multiply(washed, paper * np.clip(pigment, 0.75, 1.0))


def cel(bgr, spec, rng, s):
    smooth = bgr
    for _ in range(2):
        smooth = cv2.bilateralFilter(smooth, 7, 40, 7)
    flat = _quantize(smooth, spec.colors, rng)
    return _multiply(_saturate(flat, 1.2), 0.15 + 0.85 * _ink_lines(bgr, s))


def pencil(bgr, spec, rng, s):
    gray, _ = cv2.pencilSketch(bgr, sigma_s=60 * rng.uniform(0.9, 1.1), sigma_r=0.07, shade_factor=0.03)
    # Coloured pencil: graphite strokes (lightened: full-strength ones erase facial shading) over a
    # light wash of the original colours.
    base = cv2.bilateralFilter(bgr, 7, 40, 7)
    wash = cv2.addWeighted(base, 0.75, np.full_like(bgr, 255), 0.25, 0)
    hatch = _strokes(*bgr.shape[:2], rng, s, length=15)
    graphite = (gray.astype(np.float32) / 255) ** 0.6
    return _multiply(wash, graphite * (1.0 + 0.06 * hatch))


def render(bgr, spec, rng, s):
    plastic = cv2.edgePreservingFilter(bgr, flags=cv2.NORMCONV_FILTER, sigma_s=60 * rng.uniform(0.9, 1.1), sigma_r=0.4)
    lab = cv2.cvtColor(plastic, cv2.COLOR_BGR2LAB)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))  # local contrast reads as shaded volume
    lab[..., 0] = clahe.apply(lab[..., 0])
    shaded = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR).astype(np.float32) / 255
    lum = shaded.mean(-1, keepdims=True)
    specular = np.clip((lum - 0.7) / 0.3, 0, 1) ** 2 * 0.25  # glossy highlights
    return _saturate((np.clip(shaded + specular, 0, 1) * 255).astype(np.uint8), 1.2)


def halftone(bgr, spec, rng, s):
    h, w = bgr.shape[:2]
    flat = _saturate(_quantize(cv2.bilateralFilter(bgr, 7, 50, 7), 8, rng), 1.4)
    lum = cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    period = 5.0 * s
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xs + ys) / np.sqrt(2), (xs - ys) / np.sqrt(2)  # dot grid at 45 degrees, like print
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    radius = np.sqrt(np.clip(0.9 - lum, 0, 1)) * period * 0.5  # darker tones: bigger dots
    dots = np.clip(np.sqrt(du**2 + dv**2) - radius, 0, 1)
    tone = 0.7 + 0.3 * dots
    return _multiply(flat, tone * (0.35 + 0.65 * _ink_lines(bgr, s, block=11, c=7)))


FILTERS = {"oil": oil, "watercolor": watercolor, "cel": cel, "pencil": pencil, "render": render, "halftone": halftone}
