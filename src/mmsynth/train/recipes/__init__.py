"""Registry of training recipes: name -> "module:Class". A new method adds one line here.

Entries are imported lazily, so listing recipes (e.g. for `mmsynth train --help`) loads no model code.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmsynth.errors import InputError

RECIPES: dict[str, str] = {
    "clip": "mmsynth.train.recipes.clip:ClipRecipe",
    "vae": "mmsynth.train.recipes.vae:VaeRecipe",
    "t2i": "mmsynth.train.recipes.t2i:TextToImageRecipe",
    "inpaint": "mmsynth.train.recipes.inpaint:InpaintRecipe",
    "controlnet": "mmsynth.train.recipes.controlnet:ControlNetRecipe",
    "t2i-adapter": "mmsynth.train.recipes.t2i_adapter:AdapterRecipe",
    "gligen": "mmsynth.train.recipes.gligen:GligenRecipe",
    "composer": "mmsynth.train.recipes.composer:ComposerRecipe",
    "paint-by-example": "mmsynth.train.recipes.paint_by_example:PaintByExampleRecipe",
}


def register_recipe(name: str, target: str | type) -> None:
    """Add a recipe at run time (plugins, tests): `target` is a class or "module:Class"."""
    RECIPES[name] = target  # type: ignore[assignment]


def get_recipe(name: str) -> Any:
    """The recipe class registered as `name`; InputError lists the valid names otherwise."""
    if name not in RECIPES:
        raise InputError(f"unknown recipe '{name}'; valid recipes: {', '.join(sorted(RECIPES))}")
    target = RECIPES[name]
    if not isinstance(target, str):
        return target
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
