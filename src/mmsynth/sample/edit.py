"""Prompt-swap editing as one replayable request: invert the image under its caption, sample under the edited one.

`edit_request` only composes controls that live elsewhere: the start (`InvertedLatents`, or `NullTextInversion`),
the attention replays (`attention_replay.py`) and, for a colour swap, recolouring guidance (`recolour.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mmsynth.errors import InputError
from mmsynth.sample.attention_replay import SourceAttention, SourceCrossAttention
from mmsynth.sample.controls import Control, is_integer
from mmsynth.sample.img2img import _as_rgb
from mmsynth.sample.inversion import InvertedLatents
from mmsynth.sample.request import (
    DEFAULT_CFG,
    DEFAULT_INVERSION_CFG,
    DEFAULT_INVERSION_STEPS,
    DEFAULT_SCHEDULER,
    DEFAULT_SEED,
    GenerationRequest,
)


def edit_request(image: Any, source_prompt: str | list[str], prompt: str | list[str], **options: Any
                 ) -> GenerationRequest:
    """The self-contained, replayable request of a prompt-swap edit (invert with source_prompt, sample with prompt):
    `edit_controls`' request with its controls recorded as dicts. Options as `edit_controls`."""
    request, controls = edit_controls(image, source_prompt, prompt, **options)
    return dataclasses.replace(request, controls=[c.to_dict() for c in controls])


def edit_controls(image: Any, source_prompt: str | list[str], prompt: str | list[str],
                  steps: int = DEFAULT_INVERSION_STEPS, cfg: float = DEFAULT_CFG, seed: int = DEFAULT_SEED,
                  scheduler: str = DEFAULT_SCHEDULER, keep_attention: float = 0.0, cross_attention: float = 0.0,
                  negative_prompt_inversion: bool = True, inversion_cfg: float = DEFAULT_INVERSION_CFG,
                  model: str | None = None, strength: float = 1.0, null_text: int = 0,
                  recolour: int = 0) -> tuple[GenerationRequest, list[Control]]:
    """A prompt-swap edit as a checked request without controls and the controls it samples with, each built once
    (what `mmsynth edit` passes to `sample`, which records them).

    Lists of n images, source prompts and prompts edit n images as one batch (image i as alone, seed + i).
    strength < 1: partial inversion (invert that fraction of the steps, edit only those). keep_attention /
    cross_attention: replay the source's self- / cross-attention for that fraction of the steps (0 = off).
    null_text N > 0: null-text inversion with N Adam steps per step (`NullTextInversion`; it tunes the
    unconditional branch from the empty prompt, so negative_prompt_inversion does not apply).
    recolour M > 0: the prompts differ by one colour word; universal guidance (M backward steps of the region guide,
    confined to the old colour's pixels) draws the new colour where the old one was (`recolour.py`).
    """
    batch = isinstance(image, list)
    images = [_as_rgb(np.asarray(im)) for im in (image if batch else [image])]
    n = len(images)
    for name, value in (("source_prompt", source_prompt), ("prompt", prompt)):
        if batch != isinstance(value, list) or (batch and len(value) != n):
            raise InputError(f"edit: give one image and one {name}, or lists of equally many (one per image)")
    source: Any = images if batch else images[0]
    if not is_integer(null_text) or null_text < 0:
        raise InputError(f"null_text (Adam steps per step; 0 = off) must be an integer >= 0, got {null_text!r}")
    start: Control
    if null_text:
        from mmsynth.sample.null_text import NullTextInversion

        start = NullTextInversion(image=source, source_prompt=source_prompt, inversion_cfg=inversion_cfg,
                                  strength=strength, inner_steps=null_text)
        negative_prompt_inversion = False
    else:
        start = InvertedLatents(image=source, source_prompt=source_prompt, inversion_cfg=inversion_cfg,
                                strength=strength)
    controls: list[Control] = [start]
    if keep_attention > 0:
        controls.append(SourceAttention(source_prompt=source_prompt, until=keep_attention))
    if cross_attention > 0:
        controls.append(SourceCrossAttention(source_prompt=source_prompt, until=cross_attention))
    if not is_integer(recolour) or recolour < 0:
        raise InputError(f"recolour (backward guidance steps per step; 0 = off) must be an integer >= 0, "
                         f"got {recolour!r}")
    if recolour:
        from mmsynth.sample.recolour import recolour_guidance

        controls.append(recolour_guidance(source, source_prompt, prompt, m=recolour))
    request = GenerationRequest(prompt=prompt, negative_prompt=source_prompt if negative_prompt_inversion else "",
                                scheduler=scheduler, steps=steps, cfg=cfg, seed=seed, n=n,
                                height=images[0].shape[0], width=images[0].shape[1], model=model)
    return request.validate(limits=None), controls  # the caller bounds the size (the CLI by its --max-side)
