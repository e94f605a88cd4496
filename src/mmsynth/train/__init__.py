"""Layer 5, train: the one accelerate trainer and a recipe per method (clip, vae, t2i, ...)."""

from mmsynth.train.config import TrainConfig, load_config
from mmsynth.train.recipe import Recipe
from mmsynth.train.recipes import RECIPES, get_recipe, register_recipe
from mmsynth.train.trainer import TrainResult, train

__all__ = ["RECIPES", "Recipe", "TrainConfig", "TrainResult", "get_recipe", "load_config", "register_recipe", "train"]
