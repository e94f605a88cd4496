"""What a training method tells the one trainer: its models, its data, its loss, its artefact.

The trainer (trainer.py) never learns a method's name. A recipe subclass says which modules train
and which stay frozen, which condition maps its batches need (`conditions`, supplied by the data path:
train/conditions.py), how a batch becomes a loss, what to draw for a progress grid and how to export the
result in the owning libraries' formats. Diffusion methods subclass `DenoisingRecipe` (train/denoising.py),
which holds the shared denoising story. Register a recipe by name in `mmsynth.train.recipes.RECIPES`; the
trainer and the CLI pick it up from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from mmsynth.data.torch_dataset import collate
from mmsynth.errors import InputError
from mmsynth.models.bundle import move_module
from mmsynth.train.conditions import check_conditions
from mmsynth.train.config import TrainConfig
from mmsynth.train.data import training_examples
from mmsynth.train.latent_cache import LatentCacheExamples


@contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules in eval mode for a progress grid mid-training, each back in its own mode afterwards."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@dataclass
class NoOptions:
    """The options of a recipe without knobs of its own."""


class Recipe:
    """Base class of every recipe. Subclasses set `name`, `Options`, `trainable` and implement the hooks."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions  # a dataclass of method-specific knobs (YAML key `options`)
    defaults: ClassVar[dict[str, Any]] = {}  # overrides of TrainConfig defaults that suit this method
    description: ClassVar[str] = ""
    trains_on_latents: ClassVar[bool] = False  # True: a latent cache (pre-encoded VAE latents) may be its data
    # condition maps each example must carry (e.g. ("canny", "segmentation")): batch[name] is N x C x H x W in [0, 1]
    conditions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TrainConfig, options: Any):
        self.config = config
        self.options = options
        self.models: dict[str, torch.nn.Module] = {}  # every module the recipe uses, trainable or frozen
        self.trainable: tuple[str, ...] = ()  # names in `models` whose parameters the optimiser updates
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32  # dtype of frozen modules (fp16/bf16 under mixed precision)

    # ---------------------------------------------------------------- set-up
    def build(self) -> None:
        """Create or load the models into `self.models` and set `self.trainable` (seeded by the trainer)."""
        raise NotImplementedError

    @property
    def resolution(self) -> int:
        """Image side the models expect; the data is rendered at this size."""
        raise NotImplementedError

    def started(self, step: int) -> None:
        """Called once on the main process when the loop is about to run: `step` 0 is a fresh run, else the
        step a resume continues from (for bookkeeping in the run folder; the default does nothing)."""

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen modules: eval mode, no gradients, `weight_dtype`; trainable ones: train mode, float32.
        A subclass may then freeze parts of a trainable module (requires_grad False): they stay out of the optimiser."""
        if missing := [n for n in self.trainable if n not in self.models]:
            raise InputError(f"recipe '{self.name}' marks '{missing[0]}' trainable but has no such model "
                             f"(its models: {', '.join(self.models) or 'none'})")  # fmt: skip
        self.device, self.weight_dtype = device, weight_dtype
        for name, module in self.models.items():
            move_module(module, device, torch.float32 if name in self.trainable else weight_dtype)
            module.train(name in self.trainable)
            module.requires_grad_(name in self.trainable)

    def unwrapped(self, name: str) -> torch.nn.Module:
        """models[name] without the DDP wrapper the trainer puts around a trainable module."""
        module = self.models[name]
        return getattr(module, "module", module)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups (default: one group of every parameter of the trainable modules that
        requires a gradient); override for per-module learning rates."""
        return [{"params": [p for n in self.trainable for p in self.models[n].parameters() if p.requires_grad]}]

    def parameters(self) -> list[dict[str, Any]]:
        """What the trainer hands the optimiser; nothing to train is an error, not a run that changes nothing."""
        groups = [g for g in self.parameter_groups() if g["params"]]
        if not groups:
            raise InputError(f"recipe '{self.name}' has nothing to train: no parameter of its trainable modules "
                             f"({', '.join(self.trainable) or 'none marked'}) requires a gradient")  # fmt: skip
        return groups

    def dataset(self) -> Dataset:
        """Map-style dataset: global example index -> example dict (pixel_values, caption, the declared
        condition maps, ...)."""
        c = self.config
        conditions = check_conditions(self.conditions, f"recipe '{self.name}'")
        examples = training_examples(c.data, split=c.data_split, seed=c.data_seed, resolution=self.resolution,
                                     conditions=conditions)  # fmt: skip
        if isinstance(examples, LatentCacheExamples) and not self.trains_on_latents:
            raise InputError(
                f"config key 'data': '{c.data}' is a latent cache (VAE latents, no pixels); recipe '{self.name}' "
                "needs images: use 'shapes' or an imagefolder export"
            )
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(examples)

    # ---------------------------------------------------------------- per step
    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch -> (scalar loss to minimise, extra numbers to log)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_grid(self, step: int) -> np.ndarray | None:
        """An HxWx3 uint8 image showing progress (None: this recipe draws nothing)."""
        return None

    # ---------------------------------------------------------------- result
    def export(self, out: Path) -> Path:
        """Write the trained artefact (bundle layout) to `out`; the trainer has swapped EMA weights in."""
        raise NotImplementedError
