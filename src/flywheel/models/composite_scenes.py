"""Procedural backdrops for the composite editor: forest, city at night, beach, snowy mountains, studio, desert.

Each scene is drawn with numpy/OpenCV (gradients, shapes, value noise) into a float32 RGB array in
[0, 1], deterministically from a ``numpy.random.Generator``. They are meant to read as a plausible,
out-of-focus photo backdrop behind a sharp subject, not to fool anyone: the composite editor is the
offline demo's editor and a CPU fallback, not a generative model.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Array = np.ndarray


def _rgb(*c: float) -> Array:
    return np.array(c, dtype=np.float32) / 255.0


def vertical_gradient(h: int, w: int, stops: list[tuple[float, Array]]) -> Array:
    """Colour stops at relative heights (0 top, 1 bottom), linearly interpolated per row."""
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)
    pos = np.array([p for p, _ in stops], dtype=np.float32)
    cols = np.stack([c for _, c in stops])
    rows = np.stack([np.interp(ys, pos, cols[:, k]) for k in range(3)], axis=1)
    return np.broadcast_to(rows[:, None, :], (h, w, 3)).astype(np.float32).copy()


def value_noise(h: int, w: int, rng: np.random.Generator, cell: float, octaves: int = 3) -> Array:
    """Smooth fractal noise in [0, 1]: random grids upsampled bicubically, summed over octaves."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        grid = rng.random((gh, gw), dtype=np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp, cell = amp * 0.5, max(2.0, cell / 2)
    return np.clip(out / total, 0.0, 1.0)


def ridge(w: int, rng: np.random.Generator, base: float, rough: float, h: int) -> Array:
    """A mountain/dune skyline: y (pixels) per column from 1D fractal noise."""
    xs = np.zeros(w, np.float32)
    amp, cells = rough, 3
    for _ in range(6):
        pts = rng.uniform(-1, 1, cells + 1).astype(np.float32)
        xs += amp * np.interp(np.linspace(0, cells, w), np.arange(cells + 1), pts).astype(np.float32)
        amp, cells = amp * 0.45, cells * 2
    return (base + xs) * h


def fill_below(canvas: Array, line: Array, color: Array | Array, alpha: float = 1.0, soft: float = 1.5) -> Array:
    """Paint everything below a per-column skyline with ``color`` (a colour or an HxWx3 array)."""
    h, w = canvas.shape[:2]
    ys = np.arange(h, dtype=np.float32)[:, None]
    mask = np.clip((ys - line[None, :]) / soft + 0.5, 0.0, 1.0)[..., None] * alpha
    return canvas * (1 - mask) + color * mask


def blur(img: Array, sigma: float) -> Array:
    return cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0.3 else img


def smooth_slope(line: Array, s: float) -> Array:
    """Slope of a skyline, smoothed so shading follows the big forms instead of pixel noise."""
    k = max(3, int(25 * s) | 1)
    padded = np.pad(np.gradient(line), k // 2, mode="edge")
    return np.convolve(padded, np.ones(k, np.float32) / k, mode="valid")[None, :, None]


def _tree(layer: Array, rng: np.random.Generator, x: int, top: int, ground: int, t: float, s: float,
          leaf: Array, bark: Array) -> None:
    """A tapered trunk under a crown of leaf clumps, lit from the upper left."""
    tw = (4 + 12 * t + rng.uniform(0, 5)) * s
    trunk = np.array([[x - tw, ground], [x - tw * 0.6, top], [x + tw * 0.6, top], [x + tw, ground]], np.int32)
    cv2.fillPoly(layer, [trunk], bark.tolist())
    rx, ry = (45 + 45 * t) * s * rng.uniform(0.8, 1.2), (55 + 45 * t) * s * rng.uniform(0.8, 1.2)
    clumps = sorted(np.clip(rng.normal(0, 0.45, (int(18 + 12 * t), 2)), -0.9, 0.9), key=lambda d: -d[1])  # lower clumps first
    for dx, dy in clumps:
        cx, cy = x + dx * rx, top + dy * ry
        lit = np.clip(0.5 - 0.35 * dy - 0.2 * dx, 0, 1)  # upper-left clumps catch the light
        colour = leaf * (0.7 + 0.55 * lit) * rng.uniform(0.92, 1.08)
        r = int(rx * rng.uniform(0.22, 0.38))
        cv2.circle(layer, (int(cx), int(cy)), r, np.clip(colour, 0, 1).tolist(), -1)


def forest(h: int, w: int, rng: np.random.Generator) -> Array:
    s = max(h, w) / 512
    img = vertical_gradient(h, w, [(0, _rgb(215, 230, 210)), (0.35, _rgb(170, 195, 150)), (1, _rgb(85, 110, 65))])
    # Layers of trees, far to near: farther ones paler (aerial perspective), smaller and blurrier.
    for depth in range(4):
        t = depth / 3
        leaf = (1 - t) * _rgb(140, 170, 140) + t * _rgb(40, 85, 38)
        bark = (1 - t) * _rgb(150, 160, 140) + t * _rgb(60, 45, 32)
        layer = img.copy()
        ground = int(h * (0.64 + 0.07 * t))
        for _ in range(int(12 - 2 * depth)):
            x = int(rng.uniform(-0.05, 1.05) * w)
            _tree(layer, rng, x, int(h * rng.uniform(0.08, 0.3) * (1 - 0.4 * t)), ground, t, s, leaf, bark)
        for _ in range(int(8 + 4 * t)):  # undergrowth hides where the trunks meet the ground
            c = (int(rng.uniform(0, w)), ground + int(rng.uniform(-4, 6) * s))
            axes = (int(rng.uniform(25, 70) * s), int(rng.uniform(10, 28) * s))
            cv2.ellipse(layer, c, axes, 0, 180, 360, (leaf * rng.uniform(0.75, 1.0)).tolist(), -1)
        texture = value_noise(h, w, rng, cell=4 * s, octaves=2)[..., None]  # leaves, not flat paint
        layer = layer * (0.82 + 0.3 * texture)
        img = blur(layer, (3 - depth) * 1.5 * s)
    ground = vertical_gradient(h, w, [(0, _rgb(96, 120, 60)), (1, _rgb(60, 75, 35))])
    ground *= 0.8 + 0.4 * value_noise(h, w, rng, cell=20 * s)[..., None]
    img = fill_below(img, np.full(w, h * 0.72, np.float32) + 4 * s * np.sin(np.linspace(0, 7, w)), ground, soft=6 * s)
    # Sun rays through the canopy: soft diagonal bands, added.
    rays = np.zeros((h, w), np.float32)
    for _ in range(5):
        x0 = int(rng.uniform(0.0, 1.0) * w)
        cv2.line(rays, (x0, 0), (x0 + int(0.5 * w), h), float(rng.uniform(0.3, 0.7)), int(rng.uniform(8, 30) * s))
    return np.clip(blur(img, 1.2 * s) + 0.25 * blur(rays, 18 * s)[..., None] * _rgb(255, 245, 200), 0, 1)


def city_night(h: int, w: int, rng: np.random.Generator) -> Array:
    s = max(h, w) / 512
    img = vertical_gradient(h, w, [(0, _rgb(8, 8, 28)), (0.5, _rgb(45, 25, 70)), (0.75, _rgb(90, 45, 80)), (1, _rgb(20, 18, 30))])
    for depth, (lo, hi, col) in enumerate([(0.15, 0.45, _rgb(30, 30, 55)), (0.05, 0.35, _rgb(14, 14, 26))]):
        x = int(-rng.uniform(0, 40) * s)
        while x < w:
            bw = int(rng.uniform(40, 110) * s * (1 + depth * 0.4))
            top = int(h * rng.uniform(lo, hi))
            cv2.rectangle(img, (x, top), (x + bw, h), col.tolist(), -1)
            win, gap = int(6 * s * (1 + depth)), int(12 * s * (1 + depth))
            for wy in range(top + gap, int(h * 0.82), gap):
                for wx in range(x + gap // 2, x + bw - win, gap):
                    if rng.random() < 0.35:
                        warm = _rgb(255, 200, 120) if rng.random() < 0.7 else _rgb(170, 210, 255)
                        cv2.rectangle(img, (wx, wy), (wx + win, wy + win), (warm * rng.uniform(0.5, 1.0)).tolist(), -1)
            x += bw + int(rng.uniform(0, 12) * s)
    street = vertical_gradient(h, w, [(0, _rgb(30, 26, 40)), (1, _rgb(12, 12, 18))])
    img = fill_below(img, np.full(w, h * 0.85, np.float32), street, soft=2)
    img = blur(img, 5 * s)  # the street is far behind a portrait subject: out of focus
    # Bokeh: street lights and signs as soft discs, added on top of the blurred street.
    bokeh = np.zeros_like(img)
    palette = [_rgb(255, 180, 90), _rgb(255, 90, 170), _rgb(90, 200, 255), _rgb(255, 230, 160)]
    for _ in range(int(40 * (w * h) / 512**2) + 10):
        c = (int(rng.uniform(0, w)), int(h * rng.uniform(0.35, 0.95)))
        r = int(rng.uniform(6, 22) * s)
        col = palette[int(rng.integers(len(palette)))] * rng.uniform(0.25, 0.6)
        cv2.circle(bokeh, c, r, col.tolist(), -1)
    return np.clip(img + blur(bokeh, 2 * s), 0, 1)


def beach(h: int, w: int, rng: np.random.Generator) -> Array:
    s = max(h, w) / 512
    horizon, shore = h * rng.uniform(0.5, 0.56), h * rng.uniform(0.7, 0.76)
    img = vertical_gradient(h, w, [(0, _rgb(60, 130, 220)), (0.5, _rgb(175, 215, 245)), (1, _rgb(175, 215, 245))])
    clouds = np.zeros((h, w), np.float32)
    for _ in range(7):
        c = (int(rng.uniform(0, w)), int(rng.uniform(0.05, 0.35) * h))
        cv2.ellipse(clouds, c, (int(rng.uniform(50, 120) * s), int(rng.uniform(12, 28) * s)), 0, 0, 360, 1.0, -1)
    clouds = blur(clouds, 14 * s) * (0.6 + 0.6 * value_noise(h, w, rng, 30 * s))
    img = img * (1 - 0.8 * clouds[..., None]) + 0.8 * clouds[..., None]
    sea = vertical_gradient(h, w, [(0, _rgb(40, 120, 160)), (1, _rgb(20, 150, 160))])
    waves = 0.5 + 0.5 * np.sin(np.arange(h, dtype=np.float32)[:, None] * 0.9 / s + 3 * value_noise(h, w, rng, 40 * s))
    sea = sea * (0.9 + 0.18 * waves[..., None])
    img = fill_below(img, np.full(w, horizon, np.float32), sea)
    sand = vertical_gradient(h, w, [(0, _rgb(215, 195, 150)), (1, _rgb(235, 215, 170))])
    sand *= 0.92 + 0.12 * value_noise(h, w, rng, 6 * s)[..., None]
    line = shore + 6 * s * np.sin(np.linspace(0, rng.uniform(6, 12), w)).astype(np.float32)
    img = fill_below(img, line - 5 * s, _rgb(240, 248, 250), soft=3 * s)  # foam
    img = fill_below(img, line, sand * 0.85, soft=2 * s)  # wet sand
    img = fill_below(img, line + 10 * s, sand, soft=6 * s)
    return blur(img, 2 * s)


def snowy_mountain(h: int, w: int, rng: np.random.Generator) -> Array:
    s = max(h, w) / 512
    img = vertical_gradient(h, w, [(0, _rgb(50, 100, 190)), (0.6, _rgb(190, 215, 240)), (1, _rgb(220, 232, 245))])
    for depth, base in enumerate([0.38, 0.5, 0.64]):
        t = depth / 2
        line = ridge(w, rng, base, 0.2 - 0.05 * depth, h)
        rock = (1 - t) * _rgb(150, 165, 195) + t * _rgb(70, 80, 100)
        # Slopes facing the sun (left) are lit: shade by the skyline's slope, and cap them with snow.
        shade = np.clip(1.0 - 0.25 * smooth_slope(line, s) / s, 0.7, 1.2)
        # Snow above an altitude (plus noise), so peaks are capped and valleys are bare rock.
        snow_line = h * (base - 0.04 + 0.06 * value_noise(1, w, rng, 20)[0]) + 0.3 * (line - base * h)
        layer = fill_below(img, line, np.broadcast_to(rock * shade, (h, w, 3)))
        snow = np.broadcast_to(_rgb(240, 245, 255) * np.clip(shade, 0.8, 1.05), (h, w, 3))
        ys = np.arange(h, dtype=np.float32)[:, None]
        cap = np.clip((snow_line[None, :] - ys) / (4 * s), 0, 1) * np.clip((ys - line[None, :]) / 1.5, 0, 1)
        layer = layer * (1 - cap[..., None]) + snow * cap[..., None]
        # Mist toward each range's foot (aerial perspective), so the ranges separate.
        mist = np.clip((ys - line[None, :]) / (0.3 * h), 0, 1)[..., None] * 0.55
        layer = layer * (1 - mist) + _rgb(215, 228, 245) * mist
        img = blur(layer, (2 - depth) * 1.2 * s)
    field_ = vertical_gradient(h, w, [(0, _rgb(225, 232, 245)), (1, _rgb(245, 248, 255))])
    field_ *= 0.95 + 0.07 * value_noise(h, w, rng, 25 * s)[..., None]
    img = fill_below(img, ridge(w, rng, 0.78, 0.02, h), field_, soft=4 * s)
    return blur(img, 1.5 * s)


def studio(h: int, w: int, rng: np.random.Generator, colors: list[tuple[int, int, int]] | None = None) -> Array:
    centre, edge = (np.array(c, np.float32) / 255 for c in (colors or [(150, 154, 160), (46, 48, 56)]))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * rng.uniform(0.4, 0.6), h * 0.42
    d = np.sqrt(((xs - cx) / w) ** 2 + ((ys - cy) / h) ** 2) / 0.75
    t = np.clip(d, 0, 1)[..., None] ** 1.4
    img = centre * (1 - t) + edge * t
    grain = value_noise(h, w, rng, 3, octaves=1)[..., None] - 0.5  # paper backdrop texture
    return np.clip(img + 0.02 * grain, 0, 1)


def desert(h: int, w: int, rng: np.random.Generator) -> Array:
    s = max(h, w) / 512
    img = vertical_gradient(h, w, [(0, _rgb(80, 140, 210)), (0.55, _rgb(235, 215, 185)), (1, _rgb(240, 200, 150))])
    for depth, base in enumerate([0.52, 0.62, 0.74, 0.86]):
        t = depth / 3
        line = ridge(w, rng, base, 0.05, h)
        lit = (1 - t) * _rgb(230, 190, 140) + t * _rgb(215, 150, 80)
        sand = np.broadcast_to(lit * np.clip(1.0 - 0.5 * smooth_slope(line, s) / s, 0.65, 1.15), (h, w, 3))
        sand = sand * (0.95 + 0.08 * value_noise(h, w, rng, 5 * s)[..., None])
        img = blur(fill_below(img, line, sand, soft=1.5 * s), (3 - depth) * 0.8 * s)
    return img


SCENES: dict[str, Callable[..., Array]] = {
    "forest": forest, "city_night": city_night, "beach": beach,
    "snowy_mountain": snowy_mountain, "studio": studio, "desert": desert,
}


def draw_scene(name: str, h: int, w: int, seed: int, colors: list[tuple[int, int, int]] | None = None) -> Array:
    """A deterministic backdrop (float32 RGB in [0, 1]) for ``name`` at ``h`` x ``w``."""
    rng = np.random.default_rng(seed)
    img = studio(h, w, rng, colors) if name == "studio" else SCENES[name](h, w, rng)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
