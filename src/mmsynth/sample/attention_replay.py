"""Editing by attention replay: the source image's attention, recorded in a nested run, replayed in the edit.

Both controls record in `prepare`, with a nested run of the same request under the source prompt (the same
starting latents and, as copies, the same other controls), and replay for the first `until` fraction of the steps,
through the run's attention service (sample/attention.py), which the loop applies and removes.

- `SourceAttention` keeps the SOURCE's self-attention structure: it records every self-attention layer's queries
  and keys (forward hooks on `attn1.to_q` / `attn1.to_k` of diffusers' `Attention` modules, the processors
  untouched), and the edit pass replays them; the maps softmax(q k^T) are then the source's while the values
  (content) come from the edited prompt. This is the "inject self-attention queries and keys" variant of
  Plug-and-Play / MasaCtrl, in every attn1 layer, without Plug-and-Play's residual-feature injection.
- `SourceCrossAttention` is prompt-to-prompt's word swap: the source run's conditional cross-attention
  probabilities replace the edit's conditional ones for the first `until` of the steps; the unconditional branch
  keeps its own maps, as in the reference code (which edits the prompts' maps and leaves the null prompt's alone).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.controls import Control, Step, check_batch_length, is_number, register_control
from mmsynth.sample.inversion import check_prompt_option

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context


@dataclass(kw_only=True)
class _AttentionTap(Control):
    """Internal (not registered): sees attention tensors per (step, layer, part), told the step by `inputs`.

    kind "self": the outputs of every attn1's to_q and to_k, all branches of the batch (forward hooks on diffusers'
    projections, the processors untouched); kind "cross": every attn2's attention probabilities of the conditional
    branch (a score tap of the run's attention service).
    With `store` None it records (the tensors of the steps before `until`); given a store, it replays:
    each stored tensor replaces the one computed at the same step and layer.
    """

    name: ClassVar[str] = "attention-tap"
    kind: str = "self"
    until: float = 0.5
    store: dict[tuple[int, str, str], torch.Tensor] | None = None

    def prepare(self, ctx: Context) -> None:
        self.install(ctx)

    def install(self, ctx: Context) -> None:
        """Register with the run's attention service (the loop applies it after every control has prepared)."""
        self._recording = self.store is None
        self._kept: dict[tuple[int, str, str], torch.Tensor] = {} if self.store is None else self.store
        self._step: Step | None = None
        if self.kind == "self":
            for name, mod in attention_modules(ctx.network, "attn1").items():
                for proj in ("to_q", "to_k"):
                    ctx.attention.add_forward_hook(getattr(mod, proj), self._hook(name, proj))
            return
        self._service = ctx.attention
        ctx.attention.add_score_tap(self._cross)

    def _cross(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        """Prompt-to-prompt edits the conditional branch's maps only: the unconditional branch keeps its own (it
        has no source words), so the stored maps are the source's conditional ones, keyed by branch."""
        parts = [self._tap(layer, f"probs:{name}", chunk) if name == "cond" else chunk
                 for name, chunk in self._service.chunks(probs)]  # fmt: skip
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _tap(self, layer: str, part: str, x: torch.Tensor) -> torch.Tensor:
        step = self._step
        if step is None:
            return x
        if self._recording:
            if step.fraction < self.until:
                self._kept[(step.index, layer, part)] = x.detach()
            return x
        kept = self._kept.get((step.index, layer, part))
        return kept if kept is not None and kept.shape == x.shape else x

    def _hook(self, layer: str, proj: str) -> Any:
        return lambda module, args, output: self._tap(layer, proj, output)

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> None:
        self._step = step
        return None


@dataclass(kw_only=True)
class _SourceReplay(Control):
    """Shared by SourceAttention and SourceCrossAttention: in `prepare` a nested run of the same request under
    `source_prompt` (same starting latents and other controls) records the source's attention; the edit pass
    then replays it for the first `until` fraction of the steps. Costs one extra run."""

    per_image: ClassVar[tuple[str, ...]] = ("source_prompt",)
    kind: ClassVar[str] = "self"

    source_prompt: str | list[str] = ""  # or one per image
    until: float = 0.5

    def __post_init__(self) -> None:
        check_prompt_option(self.source_prompt, f"{self.name} source_prompt", "the source image's caption")
        if not is_number(self.until) or not 0 <= self.until <= 1:
            raise InputError(f"{self.name} until must be a fraction of the steps in [0, 1], got {self.until!r}")

    def prepare(self, ctx: Context) -> None:
        from mmsynth.sample.sampler import run_loop

        check_batch_length(self.source_prompt, ctx.request.n, self.name, "source prompts")
        self.check_prompts(ctx)
        recorder = _AttentionTap(kind=self.kind, until=float(self.until))
        # each replay records alone; the others run as copies, so that their state for this run (set in prepare,
        # for the edited prompt) is not overwritten by the nested run's prepare for the source prompt
        others = [copy.copy(c) for c in ctx.controls if not isinstance(c, _SourceReplay)]
        source = dataclasses.replace(ctx.request, prompt=self.source_prompt, controls=[])
        run_loop(ctx.bundle, source, [*others, recorder], progress=False, decode=False)
        self._replay = _AttentionTap(kind=self.kind, until=float(self.until), store=recorder._kept)
        self._replay.install(ctx)

    def check_prompts(self, ctx: Context) -> None:
        """Refuse source/edit prompt pairs the replay cannot align (nothing to check for self-attention)."""

    def inputs(self, ctx: Context, step: Step, branch: Any, latents: torch.Tensor) -> None:
        return self._replay.inputs(ctx, step, branch, latents)

    def close(self, ctx: Context) -> None:
        self._replay = None  # the attention service has already removed its taps and hooks


@register_control
@dataclass(kw_only=True)
class SourceAttention(_SourceReplay):
    """Keep the source's self-attention maps (queries and keys of every attn1) for the first `until` fraction of
    the steps: the structure of the source, the content of the edited prompt (Plug-and-Play / MasaCtrl-style)."""

    name: ClassVar[str] = "source-attention"
    kind: ClassVar[str] = "self"


@register_control
@dataclass(kw_only=True)
class SourceCrossAttention(_SourceReplay):
    """Prompt-to-prompt word swap (Hertz et al. 2022): for the first `until` fraction of the steps the edited
    prompt's cross-attention maps are the source prompt's, so each swapped word attends where the word it
    replaces did (layout kept, the new word's content written there). Prompts must have the same number of
    tokens (words swapped one for one); attn2 runs diffusers' classic AttnProcessor meanwhile."""

    name: ClassVar[str] = "source-cross-attention"
    kind: ClassVar[str] = "cross"
    until: float = 0.8

    def check_prompts(self, ctx: Context) -> None:
        tok = ctx.bundle.tokenizer
        n = ctx.request.n
        sources = self.source_prompt if isinstance(self.source_prompt, list) else [self.source_prompt] * n
        edits = ctx.request.prompt if isinstance(ctx.request.prompt, list) else [ctx.request.prompt] * n
        for source, edit in zip(sources, edits):
            a, b = (len(tok(text, truncation=True).input_ids) for text in (source, edit))
            if a != b:
                raise InputError(f"{self.name} swaps words one for one: '{source}' has {a} tokens but '{edit}' has "
                                 f"{b}; give prompts that differ only by swapped words")
