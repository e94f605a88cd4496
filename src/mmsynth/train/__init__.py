"""Layer 5, train: the one accelerate trainer and a recipe per method (clip, vae, t2i, ...).

Names are imported lazily (PEP 562), so listing recipes does not load the trainer.
"""

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "RECIPES": "mmsynth.train.recipes",
    "Recipe": "mmsynth.train.recipe",
    "TrainConfig": "mmsynth.train.config",
    "TrainResult": "mmsynth.train.trainer",
    "get_recipe": "mmsynth.train.recipes",
    "load_config": "mmsynth.train.config",
    "register_recipe": "mmsynth.train.recipes",
    "train": "mmsynth.train.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
