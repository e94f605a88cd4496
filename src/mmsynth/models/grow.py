"""Grow a trained model without changing what it computes: more transformer layers per UNet cross-attention
level, or more encoder layers in a CLIP vision tower.

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

import copy
import re
from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPModel

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


VISION_ZERO_INIT = (".self_attn.out_proj.", ".mlp.fc2.")  # the residual outputs of a CLIP encoder layer
MAX_VISION_LAYERS = 24


def _with_vision(clip: CLIPModel, **vision: int) -> CLIPModel:
    """A freshly initialised CLIPModel shaped like `clip` but for the given vision-config keys."""
    config = copy.deepcopy(clip.config)
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    return CLIPModel(config).to(clip.device, clip.dtype)


def deepen_vision_tower(clip: CLIPModel, layers: int, where: str = "vision_layers") -> CLIPModel:
    """A copy of `clip` whose vision tower has `layers` encoder layers: the trained ones in place, the new ones
    appended as identities (attention and MLP output projections zero, on pre-norm residual paths), so the image
    embeddings are exactly the original's until training moves them. The text tower is untouched, which is why
    the zoo grows this side: its text tower is the UNet's text encoder, and retrieval errors come from images."""
    old = int(clip.config.vision_config.num_hidden_layers)
    if not old <= layers <= MAX_VISION_LAYERS:
        raise InputError(f"{where} must be between the {old} layers the vision tower has and {MAX_VISION_LAYERS} "
                         f"(a tower is grown, not cut), got {layers}")  # fmt: skip
    if layers == old:
        return clip
    grown = _with_vision(clip, num_hidden_layers=layers)
    missing, unexpected = grown.load_state_dict(clip.state_dict(), strict=False)
    new_layers = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")
    if unexpected or any(not (m := new_layers.search(k)) or int(m.group(1)) < old for k in missing):
        raise RuntimeError(f"deepening moved trained weights: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, param in grown.named_parameters():
            if name in missing and any(z in name for z in VISION_ZERO_INIT):
                param.zero_()
    return grown


def refine_vision_patches(clip: CLIPModel, patch_size: int, where: str = "vision_patch") -> CLIPModel:
    """A copy of `clip` whose vision tower cuts its images into `patch_size` patches (a divisor of the old size),
    starting where the old tower would stand on an image upsampled by old/new (nearest): each new patch kernel
    weight is the sum of the old kernel's weights over the block of upsampled pixels one input pixel fills, and
    the position grid is interpolated (bicubic) to the finer one, as ViTs do when fine-tuned at a higher
    resolution (Dosovitskiy et al. 2021). Every other weight keeps its place and the text tower is untouched.
    Why: at 64x64 an 8-pixel patch holds most of a small shape, and the zoo's retrieval misses are shapes
    confused; four times the tokens let attention see their outlines."""
    vision = clip.config.vision_config
    old = int(vision.patch_size)
    if patch_size < 1 or old % patch_size or vision.image_size % patch_size:
        raise InputError(f"{where} must divide the vision tower's patch size {old} (and image size "
                         f"{vision.image_size}), got {patch_size}")  # fmt: skip
    if patch_size == old:
        return clip
    refined = _with_vision(clip, patch_size=patch_size)
    state = clip.state_dict()
    embeddings = "vision_model.embeddings."
    kernel, positions = embeddings + "patch_embedding.weight", embeddings + "position_embedding.weight"
    r = old // patch_size
    w = state.pop(kernel)  # (hidden, 3, old, old) -> (hidden, 3, new, new): sum over r x r blocks
    state[kernel] = w.reshape(*w.shape[:2], patch_size, r, patch_size, r).sum(dim=(3, 5))
    pos = state.pop(positions)  # (1 + g*g, hidden): class token, then the grid
    g_old, g_new = int(vision.image_size) // old, int(vision.image_size) // patch_size
    grid = pos[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    state[positions] = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(g_new * g_new, -1).to(pos.dtype)])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # buffers sized by the config
    missing, unexpected = refined.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise RuntimeError(f"refining moved trained weights: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return refined
