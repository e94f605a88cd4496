"""Exact geometry of Shapes objects: polygons in normalised image coordinates, boxes, centres.

Every shape is a polygon inscribed in a circle of radius `radius` (its circumradius), so size
means the same thing for all shapes and the judge can measure it back.
"""

from __future__ import annotations

import functools
import math

import numpy as np

STAR_INNER_RATIO = 0.45
CROSS_ARM_RATIO = 0.4  # arm width / total extent
CIRCLE_VERTICES = 96


def _read_only(pts: np.ndarray) -> np.ndarray:
    pts.flags.writeable = False  # memoised: a caller that wrote into it would corrupt every later scene
    return pts


@functools.cache
def unit_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of `shape` with circumradius 1, centred at 0, y pointing down, unrotated (read-only)."""
    return _read_only(_unit_polygon(shape))


def _unit_polygon(shape: str) -> np.ndarray:
    if shape == "circle":
        t = np.linspace(0.0, 2 * math.pi, CIRCLE_VERTICES, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        t = np.deg2rad([45.0, 135.0, 225.0, 315.0])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "triangle":
        t = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if shape == "cross":
        a = 1.0 / math.sqrt(1.0 + CROSS_ARM_RATIO**2)  # half extent, so the corners lie on the unit circle
        w = CROSS_ARM_RATIO * a
        pts = [(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a),
               (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a)]  # fmt: skip
        return np.array(pts, dtype=np.float64)
    raise ValueError(f"unknown shape '{shape}'")


@functools.lru_cache(maxsize=4096)
def polygon(shape: str, cx: float, cy: float, radius: float, rotation_deg: float) -> np.ndarray:
    """Vertices (N, 2) in normalised image coordinates (x right, y down, both in [0, 1]); read-only.

    Memoised because scene sampling asks for the same object's outline many times (relations, boxes).
    """
    pts = unit_polygon(shape)
    th = math.radians(rotation_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return _read_only(pts @ rot.T * radius + np.array([cx, cy]))


def box_of(poly: np.ndarray) -> tuple[float, float, float, float]:
    """Axis-aligned xyxy box of a polygon."""
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def box_center(box: tuple[float, float, float, float]) -> tuple[float, float]:
    """Centre of an xyxy box: the reference point for spatial relations, in specs and the judge."""
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
