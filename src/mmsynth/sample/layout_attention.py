"""Forward layout guidance on cross-attention (Chen et al. 2023, "Training-free layout control with
cross-attention guidance", the forward variant): no gradients and no extra UNet pass. In every
cross-attention layer the attention map of each phrase's tokens is mixed toward a window inside the
phrase's box,

    A_i <- (1 - strength) * A_i + strength * g_b * sum_p A_i(p),

so a token keeps its total attention but spends it inside its box (g_b: the box's coverage of each
cell at the layer's resolution, summing to 1). Only conditional branches are changed: the
unconditional one has no phrase. Composed with blended inpainting it is meant to say where the new
object goes (the mask's box); on the zoo it neither moves objects nor helps inpainting (docs/guidance.md).

The per-branch strengths reach the control through the UNet call's `cross_attention_kwargs` (one entry per
branch, so CFG's two branches stay one batch) as per-call data of the run's attention service
(sample/attention.py), which takes them out before diffusers sees them and runs the mixing as a score tap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from mmsynth.errors import InputError
from mmsynth.models.tokenizer import tokenize_padded
from mmsynth.sample.attention import call_data_key
from mmsynth.sample.controls import Branch, Control, ModelInputs, Step, check_batch_length, is_number, register_control

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

def _is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(is_number(v) for v in value)


def _per_image_boxes(boxes: Any) -> bool:
    """boxes given per image: a list whose items are lists of boxes (not boxes themselves)."""
    return isinstance(boxes, list) and bool(boxes) and all(isinstance(b, list) and not _is_box(b) for b in boxes)


def _check_layout(boxes: Any, phrases: Any, where: str) -> None:
    if not isinstance(boxes, list) or not boxes or not all(_is_box(b) for b in boxes):
        raise InputError(f"{where} boxes must be a non-empty list of [x0, y0, x1, y1] (fractions of the image), "
                         f"got {boxes!r:.80}")
    for b in boxes:
        if not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
            raise InputError(f"{where} box {list(b)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise InputError(f"{where} phrases must be a list of non-empty strings, one per box, got {phrases!r:.80}")
    if len(phrases) != len(boxes):
        raise InputError(f"{where} has {len(boxes)} boxes but {len(phrases)} phrases; give one phrase per box")


def box_coverage(box: list[float], h: int, w: int) -> torch.Tensor:
    """h x w: the fraction of each cell that the box [x0, y0, x1, y1] (fractions of the image) covers."""
    def overlap(lo: float, hi: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float32) / cells
        return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo)))
                .clamp_min(0) * cells)  # fmt: skip

    return overlap(box[1], box[3], h)[:, None] * overlap(box[0], box[2], w)[None, :]


def phrase_positions(tokenizer: Any, prompt: str, phrase: str, where: str) -> list[int]:
    """Token positions of `phrase` in `prompt` as the sampler tokenises it (first occurrence)."""
    ids = tokenize_padded(tokenizer, prompt).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if sub and ids[i: i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    raise InputError(f"{where} phrase '{phrase}' is not in the prompt '{prompt}'; each phrase must be words of the "
                     "prompt (the tokens whose attention moves into its box)")


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
class LayoutAttention(Control):
    """boxes: [[x0, y0, x1, y1], ...] (fractions of the image) with one phrase each, words of the prompt;
    strength in [0, 1]: how much of each phrase token's cross-attention moves into its box (1: all of it).
    boxes and phrases may also be lists of n (image i of the batch gets list i). The schedule's start/end
    limit it to part of the steps."""

    name: ClassVar[str] = "layout-attention"
    per_image: ClassVar[tuple[str, ...]] = ("boxes", "phrases")

    boxes: Any = None
    phrases: Any = None
    strength: float = 0.5

    def __post_init__(self) -> None:
        if _per_image_boxes(self.boxes):
            if not isinstance(self.phrases, list) or len(self.phrases) != len(self.boxes) or not all(
                    isinstance(p, list) for p in self.phrases):
                raise InputError("layout-attention boxes are given per image; give phrases per image too, as many")
            for i, (b, p) in enumerate(zip(self.boxes, self.phrases)):
                _check_layout(b, p, f"layout-attention (image {i})")
        else:
            _check_layout(self.boxes, self.phrases, "layout-attention")
        if not is_number(self.strength) or not 0 <= self.strength <= 1:
            raise InputError(f"layout-attention strength must be in [0, 1], got {self.strength!r}")

    @classmethod
    def option_for_image(cls, key: str, value: Any, i: int) -> Any:
        """A list of boxes (or phrases) is shared by every image; a list of such lists has one per image."""
        if key == "boxes":
            return value[i] if _per_image_boxes(value) else value
        if key == "phrases":
            return value[i] if isinstance(value, list) and value and isinstance(value[0], list) else value
        return super().option_for_image(key, value, i)

    def prepare(self, ctx: Context) -> None:
        n = ctx.request.n
        per_image = _per_image_boxes(self.boxes)
        if per_image:
            check_batch_length(self.boxes, n, "layout-attention", "box lists")
            check_batch_length(self.phrases, n, "layout-attention", "phrase lists")
        h, w = ctx.latent_shape[-2:]
        tok = ctx.bundle.tokenizer
        tokens = tok.model_max_length
        strength = torch.zeros(n, tokens)
        window = torch.zeros(n, tokens, h, w)
        for i, prompt in enumerate(ctx.request.prompts()):
            boxes, phrases = (self.boxes[i], self.phrases[i]) if per_image else (self.boxes, self.phrases)
            for box, phrase in zip(boxes, phrases):
                cover = box_coverage(list(box), h, w)
                if not cover.any():
                    raise InputError(f"layout-attention box {list(box)} covers no latent cell ({h}x{w})")
                for p in phrase_positions(tok, prompt, phrase, "layout-attention"):
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
