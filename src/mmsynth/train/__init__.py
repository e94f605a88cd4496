"""Layer 5, train: the one accelerate trainer and a recipe per method (clip, vae, t2i, ...).

Names are imported lazily (PEP 562), so listing recipes does not load the trainer.
"""

from mmsynth.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DenoisingOptions": "mmsynth.train.denoising",
    "DenoisingRecipe": "mmsynth.train.denoising",
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

__getattr__ = lazy_exports(__name__, _EXPORTS)
