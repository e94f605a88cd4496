"""Rendering: a pure function of (scene, resolution). Supersampled, then area-downsampled.

`render_scene` returns the RGB image and the exact per-pixel maps the annotations are built from,
all at the requested resolution, from the same supersampled coverage so they agree pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from mmsynth.data import vocab
from mmsynth.data.scene import Background, Scene, raster_object
from mmsynth.errors import InputError

MIN_RESOLUTION, MAX_RESOLUTION = 32, 512
SUPERSAMPLE = 4


@dataclass
class Rendered:
    """An image and its exact label maps. Label maps are uint8, 0 = background."""

    image: np.ndarray  # HxWx3 uint8
    instance: np.ndarray  # HxW: object index + 1 (list order = back to front)
    coverage: np.ndarray  # (n_objects, H, W) float32: visible coverage of each object per pixel


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise InputError(f"resolution must be an integer in {MIN_RESOLUTION}..{MAX_RESOLUTION}, got {resolution!r}")
    return resolution


def render_background(bg: Background, size: int) -> np.ndarray:
    """Float32 HxWx3 background in [0, 255]; independent of the resolution up to sampling."""
    c0 = np.array(bg.colors[0], np.float32)
    if bg.kind == "gradient":
        c1 = np.array(bg.colors[1], np.float32)
        th = math.radians(bg.angle)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        xx, yy = np.meshgrid(coords, coords)
        t = (xx * math.cos(th) + yy * math.sin(th)) / (abs(math.cos(th)) * 0.5 + abs(math.sin(th)) * 0.5) * 0.5 + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return c0 * (1 - t) + c1 * t
    img = np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    if bg.kind == "texture":
        noise = np.random.default_rng(bg.texture_seed).uniform(-1, 1, (8, 8)).astype(np.float32)
        smooth = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
        img = img + (smooth * vocab.TEXTURE_AMPLITUDE_L * 2.55)[..., None]  # achromatic offset
    return img


def owner_map(scene: Scene, size: int) -> np.ndarray:
    """size x size int16: 0 = background, k = object k-1 visible there (later objects overwrite), no supersampling."""
    owner = np.zeros((size, size), np.int16)
    for k, obj in enumerate(scene.objects, start=1):
        owner[raster_object(obj, size)] = k
    return owner


def _paint(scene: Scene, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The supersampled canvas (float32 RGB) and its owner map (0 = background, k = object k-1 on top)."""
    big = res * SUPERSAMPLE
    canvas = render_background(scene.background, big)
    owner = owner_map(scene, big)
    for k, obj in enumerate(scene.objects, start=1):
        canvas[owner == k] = np.array(obj.rgb, np.float32)
    return canvas, owner


def _downsample(canvas: np.ndarray, res: int) -> np.ndarray:
    image = cv2.resize(canvas, (res, res), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, resolution: int = 64) -> Rendered:
    """Render `scene` at `resolution` (square) with its exact instance map and coverages."""
    res = check_resolution(resolution)
    canvas, owner = _paint(scene, res)
    n = len(scene.objects)
    layers = np.stack([(owner == k).astype(np.float32) for k in range(n + 1)])  # bg + objects
    cov = np.stack([cv2.resize(layer, (res, res), interpolation=cv2.INTER_AREA) for layer in layers])
    instance = np.argmax(cov, axis=0).astype(np.uint8)
    return Rendered(image=_downsample(canvas, res), instance=instance, coverage=cov[1:])


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """Just the RGB image of `scene` (the same pixels as `render_scene`), without the label maps' cost:
    training and benchmarks render millions of these."""
    res = check_resolution(resolution)
    return _downsample(_paint(scene, res)[0], res)
