"""Attend-and-Excite (Chefer et al. 2023) as one control of the one sampler: a training-free fix for
"catastrophic neglect", the prompt's subject that never gets drawn.

In the first part of the schedule (the schedule's `end`, default 0.5 as the paper's 25 of 50 steps) the
latent is moved, before the step's prediction, down the gradient of

    loss(z_t) = max over subject tokens s of (1 - max_pixels smooth(A_s)),

where A_s is token s's cross-attention map from a conditional-only, differentiable UNet call (`predict` of
the loop, with every other control's inputs): the maps of every attn2 layer at one resolution averaged over
layers and heads, the prompt's own tokens (between the start token and the end token; `softmax_tokens="all"` adds
the end and padding tokens, the reference's SD 1.x setting) re-normalised by a softmax of 100x the
probabilities, smoothed by the reference code's 3x3 Gaussian (its `sigma` 0.5 enters as exp(-x^2 / (4 sigma^2)),
a true Gaussian of std sigma * sqrt(2), which kornia applies). The step is
step_size * sqrt(linspace(1, 0.5, steps)[i]) (the paper's schedule, scale factor 20). At a few steps
(`refine`: [fraction, threshold] pairs; the paper's steps 0, 10, 20 of 50 with 0.05, 0.5, 0.8) the update is
repeated, up to `max_refinement` times, until every subject's max attention reaches the threshold.

The subjects are `tokens` (words of the prompt); without them, the shape noun of every group a Shapes
caption names (the grammar's parse, data.captions), so the control works on the zoo's captions unasked.
Cost: one UNet forward + backward (conditional branch only) per guided step, plus the refinements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.models.tokenizer import tokenize_padded
from mmsynth.sample.attention import AttentionRecorder
from mmsynth.sample.controls import (
    Control,
    Schedule,
    Step,
    check_batch_length,
    is_integer,
    is_number,
    register_control,
)
from mmsynth.sample.layout_attention import phrase_positions

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

PAPER_REFINE = [[0.0, 0.05], [0.2, 0.5], [0.4, 0.8]]  # (fraction of the steps, threshold): steps 0, 10, 20 of 50
# the tokens the softmax over tokens spans, as the reference code's two settings: "prompt" = 1 .. end-1, the prompt's
# own tokens (its `normalize_eot`, used for SD 2.1); "all" = 1 .. T-2, with the end and padding tokens (its default,
# used for SD 1.x, whose end token takes much of the attention)
SOFTMAX_TOKENS = ("prompt", "all")
SOFTMAX_TEMPERATURE = 100.0  # the paper multiplies the probabilities by 100 before the softmax over tokens


def subject_positions(tokenizer: Any, prompt: str, words: list[str] | None, where: str) -> list[int]:
    """Token positions (as the sampler tokenises `prompt`) of the subjects: each of `words`, or, when None, the
    shape noun of every group the Shapes grammar finds in the prompt (first mention of each group)."""
    if words is not None:
        return [p for w in words for p in phrase_positions(tokenizer, prompt, w, where)]
    from mmsynth.data.captions import parse_caption

    try:
        parsed = parse_caption(prompt)
    except InputError:
        raise InputError(f"{where}: '{prompt}' is not a Shapes caption, so its subjects are not known; give tokens "
                         "(the words of the prompt to excite, e.g. [\"cat\", \"frog\"])") from None
    spans = tokenize_padded(tokenizer, prompt, return_offsets_mapping=True)["offset_mapping"]
    positions: list[int] = []
    seen: set[int] = set()
    for group, _, end in parsed.mentions:
        if group in seen:  # "the red circle" of a relation clause refers back to a group already named
            continue
        seen.add(group)
        # the noun is the phrase's last word: the last token that ends where the phrase ends
        last = [i for i, (s, e) in enumerate(spans) if e > s and e == end]
        if last:
            positions.append(last[0])
    if not positions:
        raise InputError(f"{where}: found no subject in '{prompt}'; give tokens (the words of the prompt to excite)")
    return positions


def max_attention(maps: torch.Tensor, ends: torch.Tensor, subjects: list[list[int]], sigma: float) -> torch.Tensor:
    """n x k: each subject token's largest (smoothed) attention, A&E's measure of whether it is drawn.

    maps: n x h x w x T cross-attention averaged over layers and heads; ends: n, the end token's position per
    image (the prompt's tokens are 1 .. end-1); subjects: per image, token positions (padded with -1 to k)."""
    n, h, w, t = maps.shape
    pos = torch.arange(t, device=maps.device)
    inside = (pos[None] >= 1) & (pos[None] < ends[:, None])  # n x T: the prompt's own tokens
    logits = (maps * SOFTMAX_TEMPERATURE).masked_fill(~inside[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    k = max(len(s) for s in subjects)
    index = torch.tensor([s + [s[0]] * (k - len(s)) for s in subjects], device=maps.device)  # n x k
    chosen = probs.gather(-1, index[:, None, None, :].expand(n, h, w, k)).permute(0, 3, 1, 2)  # n x k x h x w
    if sigma > 0 and min(h, w) > 1:
        import kornia

        std = sigma * math.sqrt(2.0)  # the reference kernel exp(-((x - mu) / (2 sigma))^2) in kornia's terms
        chosen = kornia.filters.gaussian_blur2d(chosen, (3, 3), (std, std), border_type="reflect")
    return chosen.flatten(2).amax(-1)


def excite_loss(max_attn: torch.Tensor) -> torch.Tensor:
    """Per image: the most neglected subject's shortfall, max_s (1 - max attention of s), at least 0."""
    return (1.0 - max_attn).clamp_min(0.0).amax(-1)


@register_control
@dataclass(kw_only=True)
class AttendExcite(Control):
    """tokens: words of the prompt whose objects must appear (every token of each word is a subject); a list of
    n such lists gives image i list i; None: the nouns of the groups of a Shapes caption.
    step_size > 0: the paper's scale factor (20); resolution: side of the attention maps used (None: the
    finest attention level coarser than the latent and at most 16 cells, the paper's 16x16 on SD's 64x64
    latent, 8x8 on the zoo's 16x16); refine: [fraction of the steps, threshold] pairs (thresholds in (0, 1]);
    max_refinement >= 0: most extra updates at such a step; smoothing >= 0: the reference code's Gaussian sigma
    (0.5; 0: none); softmax_tokens: "prompt" (tokens 1 .. end-1, the reference's SD 2.1 setting and the default
    here) or "all" (tokens 1 .. T-2, with the end and padding tokens: the reference's SD 1.x setting).
    The schedule's end says how much of the schedule is guided (default 0.5)."""

    name: ClassVar[str] = "attend-excite"
    per_image: ClassVar[tuple[str, ...]] = ("tokens",)

    schedule: Schedule = field(default_factory=lambda: Schedule(end=0.5))
    tokens: Any = None
    step_size: float = 20.0
    resolution: int | None = None
    refine: list[list[float]] = field(default_factory=lambda: [list(r) for r in PAPER_REFINE])
    max_refinement: int = 20
    smoothing: float = 0.5
    softmax_tokens: str = "prompt"

    def __post_init__(self) -> None:
        what = "attend-excite"
        if not is_number(self.step_size) or not self.step_size > 0:
            raise InputError(f"{what} step_size must be a number > 0 (the paper's 20), got {self.step_size!r}")
        if self.resolution is not None and not (is_integer(self.resolution) and self.resolution >= 1):
            raise InputError(f"{what} resolution must be an integer >= 1 (attention cells per side) or null, got "
                             f"{self.resolution!r}")
        if not is_integer(self.max_refinement) or self.max_refinement < 0:
            raise InputError(f"{what} max_refinement must be an integer >= 0, got {self.max_refinement!r}")
        if self.softmax_tokens not in SOFTMAX_TOKENS:
            raise InputError(f"{what} softmax_tokens must be one of {', '.join(SOFTMAX_TOKENS)} (the tokens the "
                             f"softmax over tokens spans), got {self.softmax_tokens!r}")
        if not is_number(self.smoothing) or self.smoothing < 0:
            raise InputError(f"{what} smoothing must be a number >= 0 (the Gaussian's sigma), got {self.smoothing!r}")
        ok = isinstance(self.refine, list) and all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(is_number(v) for v in r)
            and 0 <= r[0] < 1 and 0 < r[1] <= 1 for r in self.refine)  # fmt: skip
        if not ok:
            raise InputError(f"{what} refine must be a list of [fraction in [0, 1), threshold in (0, 1]] pairs, got "
                             f"{self.refine!r:.80}")
        if self.tokens is not None:
            lists = self.tokens if self.tokens and isinstance(self.tokens[0], list) else [self.tokens]
            if not isinstance(self.tokens, list) or not all(
                    isinstance(ws, list) and ws and all(isinstance(w, str) and w.strip() for w in ws) for ws in lists):
                raise InputError(f"{what} tokens must be a non-empty list of words of the prompt (or one such list "
                                 f"per image), got {self.tokens!r:.80}")

    @classmethod
    def option_for_image(cls, key: str, value: Any, i: int) -> Any:
        """A list of words is shared by every image; a list of such lists has one per image."""
        if key == "tokens":
            return value[i] if isinstance(value, list) and value and isinstance(value[0], list) else value
        return super().option_for_image(key, value, i)

    # ---- per run
    def prepare(self, ctx: Context) -> None:
        n = ctx.request.n
        per_image = isinstance(self.tokens, list) and bool(self.tokens) and isinstance(self.tokens[0], list)
        if per_image:
            check_batch_length(self.tokens, n, "attend-excite", "token lists")
        tok = ctx.bundle.tokenizer
        prompts = ctx.request.prompts()
        self._subjects = [subject_positions(tok, p, self.tokens[i] if per_image else self.tokens, "attend-excite")
                          for i, p in enumerate(prompts)]  # fmt: skip
        ids = torch.tensor(tokenize_padded(tok, prompts).input_ids)
        if self.softmax_tokens == "prompt":
            self._ends = (ids == tok.eos_token_id).int().argmax(-1).to(ctx.device)  # the first end token per image
        else:  # the reference's [1:-1]: every token but the start token and the last one
            self._ends = torch.full((len(prompts),), ids.shape[-1] - 1, device=ctx.device)
        h, w = ctx.latent_shape[-2:]
        self._cells = self._attention_cells(ctx, h, w)
        self._recorder = AttentionRecorder(ctx.attention, cells=self._cells[0] * self._cells[1])
        refine_steps = {}
        for fraction, threshold in self.refine:
            refine_steps[min(len(ctx.timesteps) - 1, round(fraction * len(ctx.timesteps)))] = float(threshold)
        self._refine_steps = refine_steps

    def _attention_cells(self, ctx: Context, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of the attention maps used: `resolution` per side, or the default level."""
        levels = len(ctx.network.config.block_out_channels)
        sides = [(h // 2**k, w // 2**k) for k in range(levels)]
        if self.resolution is not None:
            side = int(self.resolution)
            match = [s for s in sides if max(s) == side]
            if not match:
                raise InputError(f"attend-excite resolution {side} is not an attention level of this model at "
                                 f"{ctx.height}x{ctx.width}; valid: {', '.join(str(max(s)) for s in sides)}")
            return match[0]
        coarser = [s for s in sides[1:] if max(s) <= 16]
        return coarser[0] if coarser else sides[-1]

    # ---- the guidance
    def step_size_at(self, step: Step) -> float:
        """The paper's step: scale factor x sqrt of a linear ramp from 1 (first step) to 0.5 (last)."""
        ramp = 1.0 - 0.5 * step.index / max(1, step.count - 1)
        return float(self.step_size) * math.sqrt(ramp)

    def measure(self, latents: torch.Tensor, predict: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-image loss, its gradient w.r.t. the latents, n x k max attentions) from one conditional call."""
        z = latents.detach().requires_grad_(True)
        with self._recorder.record() as maps, torch.enable_grad():
            predict(z, branch="cond")
            if not maps:
                raise InputError(f"attend-excite found no cross-attention at {self._cells[0]}x{self._cells[1]} "
                                 "cells in this UNet; set resolution to one of its attention levels")
            n, t = z.shape[0], maps[0].shape[-1]
            stacked = torch.stack([m.float().reshape(n, -1, *self._cells, t).mean(1) for m in maps]).mean(0)
            peaks = max_attention(stacked, self._ends, self._subjects, float(self.smoothing))
            loss = excite_loss(peaks)
            # no graph when another control fixes the maps (prompt-to-prompt's replayed ones): nothing to excite
            moves = loss.requires_grad and bool(loss.gt(0).any())
            grad = torch.autograd.grad(loss.sum(), z)[0] if moves else torch.zeros_like(z)
        return loss.detach(), grad.detach(), peaks.detach()

    def before(self, ctx: Context, step: Step, latents: torch.Tensor, predict: Any) -> torch.Tensor:
        size = self.step_size_at(step)
        z = latents.detach()
        loss, grad, _ = self.measure(z, predict)
        threshold = self._refine_steps.get(step.index)
        if threshold is not None:  # iterative refinement: move each image until its subjects reach the threshold
            for _ in range(int(self.max_refinement)):
                todo = loss > 1.0 - threshold
                if not bool(todo.any()):
                    break
                z = z - size * grad * todo.to(grad.dtype).view(-1, *[1] * (z.dim() - 1))
                loss, grad, _ = self.measure(z, predict)
        return (z - size * grad).detach()  # images with loss 0 have a zero gradient
