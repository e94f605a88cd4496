"""Token grounding loss for text-to-image training (TokenCompose, Wang et al., CVPR 2024).

The shipped zoo UNet mixes up which colour goes with which shape and how many of a thing to draw, and
its phrase tokens attend almost uniformly over the image. TokenCompose adds to the denoising loss a term that
asks each grounded token to spend its cross-attention inside its object's mask:

    L_token = mean over grounded tokens t and cross-attention layers of (1 - sum_{p in M_t} A_t(p) / sum_p A_t(p))^2

(A_t: the token's attention map averaged over heads, M_t: its object's mask at the layer's resolution).
On Shapes the masks are exact and free: every word of a group phrase ("two red circles", "the blue
square") is grounded to the visible pixels of all objects of that colour and shape, found by parsing
the caption (`data.captions.parse_caption`) and rasterising the scene. TokenCompose's second term
(a per-pixel BCE on noun tokens only) is not used: here a phrase's colour, count and shape words share
one mask and would compete for the same pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from mmsynth.data.captions import parse_caption, token_mentions
from mmsynth.data.render import SUPERSAMPLE, owner_map
from mmsynth.data.scene import Scene
from mmsynth.errors import InputError
from mmsynth.sample.attention import AttentionRecorder, AttentionService

MASK_SIZE = 64  # masks are rasterised once at this size, then area-pooled to each attention layer's grid


def group_masks(scene: Scene, size: int = MASK_SIZE) -> dict[tuple[str, str], np.ndarray]:
    """(colour, shape) -> float32 size x size visible coverage of every such object (the render's own coverage)."""
    owner = owner_map(scene, size * SUPERSAMPLE)
    out: dict[tuple[str, str], np.ndarray] = {}
    for k, obj in enumerate(scene.objects, start=1):
        key = (obj.color, obj.shape)
        out[key] = out.get(key, 0.0) + cv2.resize((owner == k).astype(np.float32), (size, size),
                                                  interpolation=cv2.INTER_AREA)  # fmt: skip
    return out


def token_groups(
    captions: list[str], scenes: list[Any], offsets: list[list[tuple[int, int]]], size: int = MASK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the masks of the groups its caption names, and each token's group among them (-1: none).

    `offsets` are the tokenizer's character spans per token. A caption outside the Shapes grammar, an
    empty one (caption dropout) or an example without a scene grounds nothing. Returns masks
    (B, G, size, size), G the most groups any caption names (at least 1), and token_group (B, T).
    """
    per_example: list[list[np.ndarray]] = []
    token_group = torch.full((len(captions), len(offsets[0]) if offsets else 0), -1, dtype=torch.long)
    for b, (caption, scene, spans) in enumerate(zip(captions, scenes, offsets)):
        per_example.append([])
        if not caption or scene is None:
            continue
        try:
            parsed = parse_caption(caption)
        except InputError:
            continue
        sc = scene if isinstance(scene, Scene) else Scene.from_dict(scene)
        masks = group_masks(sc, size)
        named = [masks.get((g.color, g.shape)) for g in parsed.groups]
        if any(m is None for m in named):  # the caption names something the scene does not hold: not ours
            continue
        per_example[b] = named  # type: ignore[assignment]
        for t, mention in enumerate(token_mentions(parsed, spans)):
            if mention is not None:
                token_group[b, t] = parsed.mentions[mention][0]
    g = max([1, *(len(m) for m in per_example)])
    out = torch.zeros(len(captions), g, size, size)
    for b, masks_b in enumerate(per_example):
        for j, m in enumerate(masks_b):
            out[b, j] = torch.from_numpy(m)
    return out, token_group


def token_grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, token_group: torch.Tensor) -> torch.Tensor:
    """L_token averaged over cross-attention layers and grounded tokens; 0 (with a graph) when none is grounded.

    `maps`: each attn2 layer's attention probabilities, (B * heads, HW, T) as diffusers computes them.
    """
    valid = token_group >= 0
    if not maps:
        raise InputError("the grounding loss recorded no cross-attention maps: the UNet has no attn2 layers")
    if not valid.any():
        return sum(m.sum() for m in maps) * 0.0
    n_valid = valid.sum()
    pooled: dict[int, torch.Tensor] = {}  # the masks at each layer resolution, pooled once
    losses = []
    for probs in maps:
        batch, (hw, tokens) = masks.shape[0], probs.shape[1:]
        a = probs.float().reshape(batch, -1, hw, tokens).mean(1)  # (B, HW, T)
        if hw not in pooled:  # the layer's grid has the masks' aspect (latents are the image downsampled)
            rows = max(1, round((hw * masks.shape[-2] / masks.shape[-1]) ** 0.5))
            grid = torch.nn.functional.adaptive_avg_pool2d(masks.to(a.device), (rows, hw // rows))
            pooled[hw] = grid.flatten(2)  # (B, G, HW)
        m = pooled[hw]
        inside = torch.einsum("bpt,bgp->btg", a, m)  # attention mass of each token inside each group
        picked = inside.gather(2, token_group.clamp(min=0).to(a.device)[..., None]).squeeze(-1)  # (B, T)
        ratio = picked / a.sum(1).clamp_min(1e-8)
        losses.append(((1.0 - ratio) ** 2 * valid.to(a.device)).sum() / n_valid)
    return torch.stack(losses).mean()


class CrossAttentionRecorder(AttentionRecorder):
    """Keeps every attn2 layer's attention probabilities (with their graph) inside `with recorder.record() as maps`.

    The sampler's recorder on an attention service of its own, applied for as long as training runs (the UNet's
    cross-attention runs diffusers' classic `AttnProcessor`, which materialises the probabilities); `remove()`
    restores the processors.
    """

    def __init__(self, unet: torch.nn.Module):
        self._service = AttentionService(unet)
        super().__init__(self._service)
        self._service.apply()

    def remove(self) -> None:
        self._service.remove()
