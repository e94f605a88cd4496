"""Condition maps of a Shapes scene: exact ones from the spec, the rest by annotating its render.

The benchmark derives every condition from the scene spec, so depth, segmentation and edges are
exact here rather than estimated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsynth.annotate.registry import get_annotator
from mmsynth.data.annotations import MAP_NAMES, annotate_scene
from mmsynth.data.render import render
from mmsynth.data.scene import Scene
from mmsynth.errors import InputError

# kind -> the exact annotation map it reads (`mmsynth.data.annotations.MAP_NAMES`)
SPEC_KINDS: dict[str, str] = {name: name for name in MAP_NAMES} | {"segmentation": "semantic"}


def scene_kinds() -> list[str]:
    """Kinds `from_scene` accepts: the exact maps plus every image annotator except depth (it is exact)."""
    from mmsynth.annotate.registry import list_annotators

    return list(SPEC_KINDS) + [a.name for a in list_annotators() if a.name not in SPEC_KINDS]


def from_scene(kind: str, scene: Scene, resolution: int = 64, **params: Any) -> np.ndarray:
    """The `kind` condition of `scene` at `resolution`.

    Exact from the spec: instance, semantic, color, depth, edges, and segmentation (= semantic: shape
    class + 1, 0 background). layout draws the scene's boxes and phrases. Any other kind annotates the
    render with `params`.
    """
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a mmsynth Scene, got {type(scene).__name__}")
    if kind in SPEC_KINDS:
        if params:
            raise InputError(f"'{kind}' from a scene spec is exact and takes no parameters, got {', '.join(params)}")
        return annotate_scene(scene, resolution, n_captions=1).maps[SPEC_KINDS[kind]]
    if kind not in scene_kinds():
        raise InputError(f"unknown kind '{kind}' for a scene (valid: {', '.join(scene_kinds())})")
    image = render(scene, resolution)
    if kind == "layout":
        for name in ("boxes", "phrases"):
            if name in params:
                raise InputError(f"'layout' from a scene takes boxes and phrases from the spec, not parameter '{name}'")
        params = {**params, "boxes": [o.box() for o in scene.objects], "phrases": [o.phrase for o in scene.objects]}
    return get_annotator(kind)(image, **params)
