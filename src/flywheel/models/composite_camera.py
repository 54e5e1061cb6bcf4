"""Camera moves for the composite editor, in 2D: a homography that tilts the image plane and zooms.

A perspective warp of a photo is not a new viewpoint (nothing hidden becomes visible); the recipes'
``composite_caption`` says so, so captions never claim a camera change the CPU editor cannot make.
"""

from __future__ import annotations

import numpy as np


def camera_matrix(w: int, h: int, yaw: float, pitch: float, roll: float, zoom: float,
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


def cover(M: np.ndarray, w: int, h: int) -> np.ndarray:
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
