"""The attention service: controls register taps and hooks, the loop applies them once and removes them last-in-first-
out, so a run leaves the UNet exactly as it found it, whatever attention controls it combined."""

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from mmsynth.sample import GenerationRequest, LayoutAttention, sample
from mmsynth.sample.attend_excite import AttendExcite
from mmsynth.sample.attention import AttentionService, attention_modules
from mmsynth.sample.attention_replay import SourceAttention, SourceCrossAttention
from mmsynth.sample.controls import Control

PROMPT = "a red circle left of a blue square"
SOURCE = "a red circle left of a green square"
BOXES = [[0.0, 0.2, 0.5, 0.8], [0.5, 0.2, 1.0, 0.8]]


def _state(unet: torch.nn.Module) -> dict:
    """Everything an attention patch may leave behind: processor objects, wrapped score functions, hooks."""
    return {
        "processors": {k: id(v) for k, v in unet.attn_processors.items()},
        "scores": sorted(n for n, m in attention_modules(unet, "attn2").items()
                         if "get_attention_scores" in m.__dict__),
        "hooks": sorted(n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks),
    }


@dataclass(kw_only=True)
class _Counting(Control):
    """Counts its prepares: a nested source run must not prepare the outer run's controls again."""

    name: ClassVar[str] = "counting"

    def __post_init__(self) -> None:
        self.prepared = 0

    def prepare(self, ctx) -> None:
        self.prepared += 1


def _layout() -> LayoutAttention:
    return LayoutAttention(boxes=BOXES, phrases=["red circle", "square"], strength=0.7)  # in both prompts


@pytest.mark.parametrize("make", [
    lambda: [_layout(), AttendExcite(tokens=["circle", "square"])],
    lambda: [_layout(), SourceCrossAttention(source_prompt=SOURCE, until=0.5)],
    lambda: [SourceCrossAttention(source_prompt=SOURCE, until=0.5), AttendExcite(tokens=["circle", "square"]),
             SourceAttention(source_prompt=SOURCE, until=0.5)],
], ids=["layout+excite", "layout+cross-replay", "cross-replay+excite+self-replay"])
def test_combined_attention_controls_leave_the_unet_as_they_found_it(make):
    from mmsynth.models.zoo import tiny_bundle

    used, fresh = tiny_bundle(0), tiny_bundle(0)
    before = _state(used.unet)
    plain = GenerationRequest(prompt=PROMPT, steps=3, seed=1)
    counting = _Counting()
    sample(used, GenerationRequest(prompt=PROMPT, steps=4, seed=2), [counting, *make()], progress=False)
    assert _state(used.unet) == before
    assert counting.prepared == 1
    after = sample(used, plain, progress=False).images
    assert np.array_equal(after, sample(fresh, plain, progress=False).images)


def test_a_failing_run_removes_what_it_applied(bundle):
    before = _state(bundle.unet)
    with pytest.raises(Exception, match="not in the prompt"):
        sample(bundle, GenerationRequest(prompt=PROMPT, steps=2),
               [AttendExcite(tokens=["circle"]), LayoutAttention(boxes=[BOXES[0]], phrases=["purple star"])],
               progress=False)
    assert _state(bundle.unet) == before


def test_the_service_applies_taps_in_order_and_refuses_late_registration(bundle):
    service = AttentionService(bundle.unet)
    seen: list[str] = []
    service.add_score_tap(lambda layer, probs: seen.append("a") or probs)
    service.add_score_tap(lambda layer, probs: seen.append("b") or probs * 1.0)
    before = _state(bundle.unet)
    with service.applied():
        assert _state(bundle.unet) != before
        with pytest.raises(RuntimeError, match="before the run starts"):
            service.add_score_tap(lambda layer, probs: probs)
        x = torch.randn(1, 4, 8, 8)
        context = torch.randn(1, 77, bundle.unet.config.cross_attention_dim)
        bundle.unet(x, 10, encoder_hidden_states=context)
    assert seen[:2] == ["a", "b"] and len(seen) == 2 * len(attention_modules(bundle.unet, "attn2"))
    assert _state(bundle.unet) == before


@dataclass(kw_only=True)
class _Maps(Control):
    """Keeps, per branch, the first step's cross-attention maps as the layers used them (after every other tap)."""

    name: ClassVar[str] = "maps"

    def prepare(self, ctx) -> None:
        self.maps: dict[str, list[torch.Tensor]] = {}
        self._service = ctx.attention
        self._step = None
        ctx.attention.add_score_tap(self._keep)

    def inputs(self, ctx, step, branch, latents):
        self._step = step.index

    def _keep(self, layer, probs):
        if self._step == 0:
            for name, chunk in self._service.chunks(probs):
                self.maps.setdefault(name, []).append(chunk.detach().clone())
        return probs


def test_prompt_to_prompt_replaces_the_conditional_maps_only(bundle):
    request = GenerationRequest(prompt=PROMPT, steps=3, seed=5)
    plain, source, edit = _Maps(), _Maps(), _Maps()
    sample(bundle, request, [plain], progress=False)
    sample(bundle, GenerationRequest(prompt=SOURCE, steps=3, seed=5), [source], progress=False)
    sample(bundle, request, [SourceCrossAttention(source_prompt=SOURCE, until=0.5), edit], progress=False)
    for branch, expected in (("uncond", plain), ("cond", source)):
        assert len(edit.maps[branch]) == len(expected.maps[branch]) > 0
        for used, want in zip(edit.maps[branch], expected.maps[branch]):
            torch.testing.assert_close(used, want)
    assert not torch.allclose(edit.maps["cond"][0], plain.maps["cond"][0])  # the prompts differ: a real swap
