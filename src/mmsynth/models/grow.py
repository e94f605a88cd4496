"""Grow a trained UNet without changing what it computes: more transformer layers per cross-attention level.

A UNet whose accuracy has stopped rising with steps is short of capacity, and retraining a wider one from
scratch costs every step again. Deepening the attention stack keeps the skip-connection layout (so every
trained weight keeps its place) and starts the new `BasicTransformerBlock`s as identities: their attention
and feed-forward output projections are zero, and each sits on a residual path, so the grown UNet's output
equals the original's exactly until training moves them (the zero-init residual trick of Goyal et al. 2017,
and of ControlNet's zero convolutions). The low-resolution levels are where binding, counting and relations
are decided and where extra attention is cheap (a 4x4 or 8x8 grid); the 16x16 level holds most of a step's
compute, so the usual growth is `(1, 2, 2)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel

from mmsynth.errors import InputError

MAX_DEPTH = 8
ZERO_INIT = (".attn1.to_out.0.", ".attn2.to_out.0.", ".ff.net.2.")  # the residual outputs of a transformer block
_BLOCK = re.compile(r"\.transformer_blocks\.(\d+)\.")


def attention_depth(unet: UNet2DConditionModel) -> tuple[int, ...]:
    """Transformer layers per down level as the UNet's config gives them (an int means the same at every level)."""
    depth = unet.config.transformer_layers_per_block
    levels = len(unet.config.down_block_types)
    return tuple(depth) if isinstance(depth, (list, tuple)) else (int(depth),) * levels


def deepen_attention(unet: UNet2DConditionModel, depth: Sequence[int], where: str = "depth") -> UNet2DConditionModel:
    """A copy of `unet` with `depth[i]` transformer layers at down level i (mirrored in the up path; the mid
    block takes the last level's), every trained weight in place and the new layers starting as identities."""
    old = attention_depth(unet)
    new = tuple(int(d) for d in depth)
    if len(new) != len(old):
        raise InputError(f"{where} needs one layer count per UNet level ({len(old)}), got {len(new)}: {list(new)}")
    if any(not 1 <= d <= MAX_DEPTH for d in new) or any(n < o for n, o in zip(new, old)):
        raise InputError(f"{where} {list(new)}: each level takes 1..{MAX_DEPTH} layers and at least the "
                         f"{list(old)} it has (a UNet is grown, not cut)")  # fmt: skip
    if new == old:
        return unet
    # diffusers ignores a key listed in `_use_default_values` (those not given when the model was built)
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    per_up_block = unet.config.layers_per_block + 1
    config["transformer_layers_per_block"] = list(new)
    config["reverse_transformer_layers_per_block"] = [[d] * per_up_block for d in reversed(new)]
    grown = UNet2DConditionModel.from_config(config).to(unet.device, unet.dtype)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not _BLOCK.search(k) for k in missing):
        raise RuntimeError(f"deepening moved trained weights: unexpected {unexpected[:3]}, missing {missing[:3]}")
    new_keys = set(missing)
    with torch.no_grad():
        for name, param in grown.named_parameters():
            if name in new_keys and any(z in name for z in ZERO_INIT):
                param.zero_()
    return grown
