"""A training probe that makes a vision tower's patches say which shape and colour lie under them.

The zoo's CLIP retrieval misses are mostly one object's shape mistaken (square for cross, star for triangle),
and mostly beside another object (`mmsynth bench components`: shape swaps). The contrastive loss says only
that a whole image is nearer its caption than the batch's others, which a near miss rarely tests. Shapes
knows every pixel's object exactly, so a linear head reads each patch token and must give the fractions of the
patch covered by each shape and each colour (background a class of both): dense supervision of exactly what
the misses get wrong. It reads the tokens that enter the last encoder layer, the ones the class token attends
to there before it becomes the image embedding. The head only trains the tower and is not exported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.data.render import owner_map
from mmsynth.data.scene import Scene
from mmsynth.data.vocab import COLOR_NAMES, SHAPES

SHAPE_CLASSES: tuple[str, ...] = ("background", *SHAPES)
COLOUR_CLASSES: tuple[str, ...] = ("background", *COLOR_NAMES)


def _fractions(owner: np.ndarray, lookup: np.ndarray, n_classes: int, patch: int) -> np.ndarray:
    """(G*G, n_classes): per patch of the owner map, the share of its pixels in each class (`lookup[owner]`)."""
    classes = lookup[owner]
    grid = owner.shape[0] // patch
    one_hot = np.eye(n_classes, dtype=np.float32)[classes]  # (R, R, C)
    return one_hot.reshape(grid, patch, grid, patch, n_classes).mean(axis=(1, 3)).reshape(grid * grid, n_classes)


def patch_targets(scenes: list[Any], resolution: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft labels of every patch of every scene (dicts or Scenes), in the tower's token order (row-major):
    (B, G*G, len(SHAPE_CLASSES)) shape fractions and (B, G*G, len(COLOUR_CLASSES)) colour fractions."""
    shapes, colours = [], []
    for s in scenes:
        scene = s if isinstance(s, Scene) else Scene.from_dict(s)
        owner = owner_map(scene, resolution)  # 0 = background, k = object k-1 on top
        shape_of = np.array([0] + [SHAPE_CLASSES.index(o.shape) for o in scene.objects])
        colour_of = np.array([0] + [COLOUR_CLASSES.index(o.color) for o in scene.objects])
        shapes.append(_fractions(owner, shape_of, len(SHAPE_CLASSES), patch))
        colours.append(_fractions(owner, colour_of, len(COLOUR_CLASSES), patch))
    return torch.from_numpy(np.stack(shapes)), torch.from_numpy(np.stack(colours))


class PatchLabelHead(torch.nn.Module):
    """Linear head: a patch token -> logits over `SHAPE_CLASSES` and `COLOUR_CLASSES`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, len(SHAPE_CLASSES) + len(COLOUR_CLASSES))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(tokens)
        return logits[..., : len(SHAPE_CLASSES)], logits[..., len(SHAPE_CLASSES) :]


def _object_patch_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float | None:
    """Top-1 accuracy on the patches that one object covers at least half of (background is the easy class)."""
    share, label = target.max(-1)
    scored = (label > 0) & (share >= 0.5)
    if not bool(scored.any()):
        return None
    return float((logits.argmax(-1)[scored] == label[scored]).float().mean())


def patch_label_loss(
    head: torch.nn.Module, tokens: torch.Tensor, scenes: list[Any], resolution: int, patch: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft cross-entropy of `head` on the patch `tokens` (B, G*G, D; class token removed) against the scenes'
    exact shape and colour fractions, the mean of the two; logs each and their accuracies on object patches."""
    shape_t, colour_t = (t.to(tokens.device) for t in patch_targets(scenes, resolution, patch))
    if tokens.shape[1] != shape_t.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens for a {resolution}px image in {patch}px patches")
    shape_logits, colour_logits = head(tokens.float())
    # cross-entropy against class probabilities, averaged over patches
    shape_loss = F.cross_entropy(shape_logits.flatten(0, 1), shape_t.flatten(0, 1))
    colour_loss = F.cross_entropy(colour_logits.flatten(0, 1), colour_t.flatten(0, 1))
    logs = {"patch_shape_loss": float(shape_loss.detach()), "patch_colour_loss": float(colour_loss.detach())}
    for name, logits, target in (("shape", shape_logits, shape_t), ("colour", colour_logits, colour_t)):
        acc = _object_patch_accuracy(logits.detach(), target)
        if acc is not None:
            logs[f"patch_{name}_acc"] = acc
    return (shape_loss + colour_loss) / 2, logs
