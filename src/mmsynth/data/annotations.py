"""Every annotation of a scene, derived from the spec and its exact render (never estimated).

Label maps (uint8, 0 = background): instance (object index + 1, back to front), semantic (shape
class + 1), color (colour class + 1), depth by layer (nearer is brighter), edges (0/255, exact
boundaries of the instance map). Per-object records carry boxes in pixels and normalised xyxy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.segmentation import find_boundaries

from mmsynth.data import vocab
from mmsynth.data.captions import captions
from mmsynth.data.render import render_scene
from mmsynth.data.scene import Scene, group_relations, groups, object_relations, visible_fractions

MAP_NAMES: tuple[str, ...] = ("instance", "semantic", "color", "depth", "edges")


def depth_value(z: int) -> int:
    """Depth level of layer z (0 = back): fixed levels so depth means the same in every scene."""
    return int(round(255 * (z + 1) / vocab.MAX_OBJECTS))


@dataclass
class Annotated:
    """An image with its maps and records; `records` is JSON-serialisable."""

    image: np.ndarray
    maps: dict[str, np.ndarray]
    records: dict[str, Any]


N_CAPTIONS = 4  # true captions kept per scene (a training example picks one)


def annotate_scene(scene: Scene, resolution: int = 64, n_captions: int = N_CAPTIONS) -> Annotated:
    """Render `scene` and derive all its annotations at `resolution`."""
    r = render_scene(scene, resolution)
    inst = r.instance
    shape_lut = np.array([0] + [vocab.SHAPES.index(o.shape) + 1 for o in scene.objects], np.uint8)
    color_lut = np.array([0] + [vocab.COLOR_NAMES.index(o.color) + 1 for o in scene.objects], np.uint8)
    depth_lut = np.array([0] + [depth_value(z) for z in range(len(scene.objects))], np.uint8)
    maps = {
        "instance": inst,
        "semantic": shape_lut[inst],
        "color": color_lut[inst],
        "depth": depth_lut[inst],
        "edges": (find_boundaries(inst, mode="inner") * 255).astype(np.uint8),
    }
    vis = visible_fractions(scene.objects)
    objects = []
    for z, o in enumerate(scene.objects):
        box = o.box()
        objects.append(
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "phrase": o.phrase,
                "z": z,
                "box": [round(v * resolution, 2) for v in box],
                "box_norm": [round(v, 4) for v in box],
                "visible_fraction": round(vis[z], 3),
            }
        )
    def tally(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in scene.objects:
            out[getattr(o, key)] = out.get(getattr(o, key), 0) + 1
        return out

    records = {
        "resolution": resolution,
        "objects": objects,
        "phrases": [o.phrase for o in scene.objects],
        "relations": [{"subject": a, "relation": rel, "object": b} for a, rel, b in object_relations(scene)],
        "group_relations": [{"subject": a, "relation": rel, "object": b} for a, rel, b in group_relations(scene)],
        "groups": groups(scene),
        "counts": {
            "total": len(scene.objects),
            "by_shape": tally("shape"),
            "by_color": tally("color"),
            "by_phrase": tally("phrase"),
        },
        "captions": captions(scene, n_captions),
    }
    return Annotated(image=r.image, maps=maps, records=records)
