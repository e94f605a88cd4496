"""Forward layout guidance on cross-attention (Chen et al. 2023, "Training-free layout control with
cross-attention guidance", the forward variant): no gradients and no extra UNet pass. In every
cross-attention layer the attention map of each phrase's tokens is mixed toward a window inside the
phrase's box,

    A_i <- (1 - strength) * A_i + strength * g_b * sum_p A_i(p),

so a token keeps its total attention but spends it inside its box (g_b normalised to sum 1 at the layer's
resolution). Only conditional branches are changed: the unconditional one has no phrase. Composed with blended
inpainting it is meant to say where the new object goes (the mask's box); on the zoo it neither moves objects nor
helps inpainting (docs/guidance.md). The backward variant, which the paper finds much stronger, is the
`layout-guidance` control (sample/layout_guidance.py).

The window. The paper describes g_b only as a smooth window that peaks inside the box and decays quickly outside
it, without a formula, and the reference code (silent-chen/layout-guidance) implements backward guidance only.
Here g_b is the box's coverage of each latent cell (1 inside, the covered fraction on its border) and, with
`softness` s > 0, outside the box max(coverage, exp(-d^2 / (2 s^2))), d the distance from the cell's centre to the
box in fractions of the image side: a smooth window of our choosing. The default s = 0 is the hard coverage window
this control always had, so requests saved before the option existed replay unchanged; s of about 0.05-0.1 gives
the paper's kind of window.

The per-branch strengths reach the control through the UNet call's `cross_attention_kwargs` (one entry per
branch, so CFG's two branches stay one batch) as per-call data of the run's attention service
(sample/attention.py), which takes them out before diffusers sees them and runs the mixing as a score tap.
Boxes are checked by sample/layout.check_boxes (at most 30) and phrases found in the prompt by
sample/layout.phrase_token_positions (a shape word's plural matches: "red circle" in "two red circles").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from mmsynth.errors import InputError
from mmsynth.sample.attention import call_data_key
from mmsynth.sample.controls import Branch, Control, ModelInputs, Step, is_number, register_control
from mmsynth.sample.layout import (
    LayoutOptions,
    check_layout_option,
    image_layouts,
    phrase_token_positions,
    phrases_token_positions,
)

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

def box_coverage(box: list[float], h: int, w: int) -> torch.Tensor:
    """h x w: the fraction of each cell that the box [x0, y0, x1, y1] (fractions of the image) covers."""
    def overlap(lo: float, hi: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float32) / cells
        return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
                .clamp_min(0) * cells)  # fmt: skip

    return overlap(box[1], box[3], h)[:, None] * overlap(box[0], box[2], w)[None, :]


def box_window(box: list[float], h: int, w: int, softness: float = 0.0) -> torch.Tensor:
    """h x w forward-guidance window of a box: its coverage of each cell, and with softness s > 0, outside the box a
    Gaussian fall-off exp(-d^2 / (2 s^2)) of the distance d from a cell's centre to the box (fractions of the image
    side), whichever is larger (see the module docstring). Not normalised."""
    cover = box_coverage(box, h, w)
    if softness <= 0:
        return cover
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    dy = (box[1] - ys).clamp_min(0) + (ys - box[3]).clamp_min(0)
    dx = (box[0] - xs).clamp_min(0) + (xs - box[2]).clamp_min(0)
    fall = torch.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2.0 * float(softness) ** 2))
    return torch.maximum(cover, fall)


def phrase_positions(tokenizer: Any, prompt: str, phrase: str, where: str) -> list[int]:
    """Token positions of `phrase` in `prompt` as the sampler tokenises it (first occurrence; sample/layout.py)."""
    return phrase_token_positions(tokenizer, prompt, phrase, where)


def mix_attention(probs: torch.Tensor, strength: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B*heads x HW x T) with each token's map mixed toward its window.

    strength: B x T (0 for tokens left alone); window: B x T x h x w at any resolution of the same aspect
    (resized by area to the layer's HW and normalised to sum 1 per token).
    """
    b, t = strength.shape
    heads, hw, tokens = probs.shape[0] // b, probs.shape[1], probs.shape[2]
    if tokens != t:  # tokens appended after the text (another control's extra context): left alone
        pad = tokens - t
        strength = F.pad(strength, (0, pad))
        window = F.pad(window, (0, 0, 0, 0, 0, pad))
    h0, w0 = window.shape[-2:]
    lh = max(1, round(math.sqrt(hw * h0 / w0)))
    g = F.interpolate(window, size=(lh, hw // lh), mode="area").flatten(2)
    g = g / g.sum(-1, keepdim=True).clamp_min(1e-8)
    a = probs.reshape(b, heads, hw, tokens)
    lam = strength.to(a.dtype)[:, None, None, :]
    mass = a.sum(dim=2, keepdim=True)
    out = a * (1 - lam) + lam * g.to(a.dtype).transpose(1, 2)[:, None] * mass
    return out.reshape(probs.shape)


@register_control
@dataclass(kw_only=True)
class LayoutAttention(LayoutOptions, Control):
    """boxes: [[x0, y0, x1, y1], ...] (fractions of the image, at most 30) with one phrase each, words of the prompt;
    strength in [0, 1]: how much of each phrase token's cross-attention moves into its box (1: all of it);
    softness >= 0: the window's Gaussian fall-off outside the box, in fractions of the image side (0: the box's
    coverage alone; see the module docstring). boxes and phrases may also be lists of n (image i of the batch gets
    list i). The schedule's start/end limit it to part of the steps."""

    name: ClassVar[str] = "layout-attention"

    boxes: Any = None
    phrases: Any = None
    strength: float = 0.5
    softness: float = 0.0

    def __post_init__(self) -> None:
        check_layout_option(self.boxes, self.phrases, "layout-attention")
        if not is_number(self.strength) or not 0 <= self.strength <= 1:
            raise InputError(f"layout-attention strength must be in [0, 1], got {self.strength!r}")
        if not is_number(self.softness) or not 0 <= self.softness <= 1:
            raise InputError(f"layout-attention softness must be in [0, 1] (fractions of the image side), got "
                             f"{self.softness!r}")


    def prepare(self, ctx: Context) -> None:
        n = ctx.request.n
        layouts = image_layouts(self.boxes, self.phrases, n, "layout-attention")
        h, w = ctx.latent_shape[-2:]
        tok = ctx.bundle.tokenizer
        tokens = tok.model_max_length
        strength = torch.zeros(n, tokens)
        window = torch.zeros(n, tokens, h, w)
        for i, prompt in enumerate(ctx.request.prompts()):
            boxes, phrases = layouts[i]
            positions = phrases_token_positions(tok, prompt, phrases, "layout-attention")
            for box, where in zip(boxes, positions):
                cover = box_window(list(box), h, w, float(self.softness))
                if not cover.any():
                    raise InputError(f"layout-attention box {list(box)} covers no latent cell ({h}x{w})")
                for p in where:
                    strength[i, p] = float(self.strength)
                    window[i, p] = torch.maximum(window[i, p], cover)
        self._strength, self._window = strength.to(ctx.device), window.to(ctx.device, ctx.dtype)
        self._service = ctx.attention
        ctx.attention.add_score_tap(self._mix)

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        strength = self._strength if branch.name != "uncond" else torch.zeros_like(self._strength)
        return ModelInputs(cross_attention_kwargs={call_data_key(self.name): {"strength": strength,
                                                                              "window": self._window}})

    def _mix(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        """The score tap: this call's maps mixed toward the boxes (the call's strengths ride in its kwargs)."""
        cur = self._service.call_data.get(self.name)
        if cur is None or not bool(cur["strength"].any()):
            return probs
        return mix_attention(probs, cur["strength"], cur["window"])
