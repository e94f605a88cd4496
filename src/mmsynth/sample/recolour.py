"""Recolour guidance for prompt-swap edits: the edited colour drawn into where the source colour was.

A prompt swap that changes a colour ("a red circle" -> "a cyan circle") from a partial inversion keeps the
object's shape and place, but the inverted latent still carries the old colour, and the zoo's UNet often
mixes the two (a purple or two-tone object; docs/editing.md). This composes the edit with universal
guidance (universal.py): the region guide pulls the new colour into the region of the old one, found in the
source image by the `color-region` annotator, with backward guidance (m Adam steps on the x0 correction),
confined to that region so the rest of the image is left to the inversion.

Only the user's inputs are used: the source image and the two prompts (whose one changed colour word names
both colours). The result is an ordinary `UniversalGuidance` control of shipped guides, so the edit's
request replays from its JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsynth.errors import InputError
from mmsynth.sample.universal import UniversalGuidance

RECOLOUR_LR = 0.1  # Adam step of the backward correction (seed 5, n = 40: docs/editing.md)


def colour_change(source_prompt: str, prompt: str) -> tuple[str, str]:
    """(old colour, new colour) of a swap whose prompts name the same shapes and differ in one colour."""
    from mmsynth.data.captions import parse_caption

    old, new = parse_caption(source_prompt).groups, parse_caption(prompt).groups
    if len(old) != len(new) or any(a.shape != b.shape or a.count != b.count for a, b in zip(old, new)):
        raise InputError(f"recolour: {source_prompt!r} -> {prompt!r} must name the same shapes in the same order, "
                         "changing only a colour (e.g. 'a red circle' -> 'a blue circle')")
    changes = {(a.color, b.color) for a, b in zip(old, new) if a.color != b.color}
    if len(changes) != 1:
        raise InputError(f"recolour: {source_prompt!r} -> {prompt!r} must change exactly one colour word "
                         f"(found {len(changes)} colour changes)")
    return changes.pop()


def recolour_guidance(image: Any, source_prompt: str | list[str], prompt: str | list[str], m: int = 5,
                      lr: float = RECOLOUR_LR) -> UniversalGuidance:
    """The guidance control of a recolouring swap; lists of images and prompts give one guide per image."""
    from mmsynth.annotate import annotate

    batch = isinstance(image, list)
    images = image if batch else [image]
    sources = source_prompt if batch else [source_prompt]
    prompts = prompt if batch else [prompt]
    masks, params = [], []
    for img, src, dst in zip(images, sources, prompts):
        old, new = colour_change(src, dst)
        region = annotate("color-region", np.asarray(img), color=old)
        if not region.any():
            raise InputError(f"recolour: no {old} pixels in the source image (its caption says {src!r})")
        masks.append(region)
        params.append({"mask": region, "color": new})
    return UniversalGuidance(guide=["region"] * len(images) if batch else "region",
                             params=params if batch else params[0], s0=0.0, m=m, lr=lr,
                             mask=masks if batch else masks[0])
