"""Layer 1, data: the procedural Shapes world. Scene spec -> image + exact annotations -> exports."""

from mmsynth.data.annotations import MAP_NAMES, Annotated, annotate_scene
from mmsynth.data.captions import Group, ParsedCaption, captions, expected_from_scene, parse_caption
from mmsynth.data.render import render, render_scene
from mmsynth.data.scene import Background, Scene, ShapeObject, sample_scene

__all__ = [
    "MAP_NAMES",
    "Annotated",
    "Background",
    "Group",
    "ParsedCaption",
    "Scene",
    "ShapeObject",
    "annotate_scene",
    "captions",
    "expected_from_scene",
    "parse_caption",
    "render",
    "render_scene",
    "sample_scene",
]
