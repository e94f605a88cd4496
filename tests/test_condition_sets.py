"""Conditioning as data: condition sets (branches) a control adds, inputs asked once per call for all branches,
class labels through the network's own embedding, and where extra context tokens sit."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import UNet2DConditionModel

from mmsynth.models.denoiser import ModelInputs, UNetDenoiser
from mmsynth.sample import GenerationRequest, sample
from mmsynth.sample.controls import Branch, Control
from mmsynth.sample.sampler import Context, encode_text

PROMPT = "a red circle left of a blue square"
SECOND = "three green stars"


@dataclass(kw_only=True)
class SecondPrompt(Control):
    """A third condition set: out = uncond + cfg (cond - uncond) + weight (second - uncond)."""

    name: ClassVar[str] = "second-prompt"
    prompt: str = SECOND
    weight: float = 2.0

    def condition_sets(self, ctx, branches):
        context = encode_text(ctx.bundle, [self.prompt]).repeat(ctx.request.n, 1, 1)
        return [*branches, Branch("second", self.weight, context)]


def test_a_control_adds_a_condition_set_to_the_guidance_sum(bundle):
    request = GenerationRequest(prompt=PROMPT, steps=3, seed=1, cfg=4.0).validate()
    ctx = Context.create(bundle, request, [SecondPrompt()])
    assert [(b.name, b.weight) for b in ctx.branches] == [("uncond", 0.0), ("cond", 4.0), ("second", 2.0)]
    ctx.latents = ctx.noise()
    step = ctx.make_step(0)
    with torch.no_grad():
        guided = ctx.predict(ctx.latents, step)
        uncond, cond, second = (ctx.predict(ctx.latents, step, branch=name) for name in ("uncond", "cond", "second"))
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond) + 2.0 * (second - uncond), atol=1e-5, rtol=1e-4)
    plain = sample(bundle, request, progress=False).images
    assert not (sample(bundle, request, [SecondPrompt()], progress=False).images == plain).all()


@dataclass(kw_only=True)
class CountingInputs(Control):
    """Records each call's branches: a network of its own (a ControlNet) must run once per call, batched."""

    name: ClassVar[str] = "counting-inputs"

    def prepare(self, ctx):
        self.calls = []

    def branch_inputs(self, ctx, step, branches, latents):
        self.calls.append([b.name for b in branches])
        return [None] * len(branches)


def test_a_control_is_asked_once_per_model_call_for_all_branches(bundle):
    counting = CountingInputs()
    sample(bundle, GenerationRequest(prompt=PROMPT, steps=4, seed=1), [counting], progress=False)
    assert counting.calls == [["uncond", "cond"]] * 4
    guess = CountingInputs(schedule=dataclasses.replace(CountingInputs().schedule, branch="cond"))
    sample(bundle, GenerationRequest(prompt=PROMPT, steps=2, seed=1), [guess], progress=False)
    assert guess.calls == [["cond"]] * 2  # a cond-only control is asked for the conditional branch alone


@dataclass(kw_only=True)
class ExtraTokens(Control):
    """Appends k tokens to every branch's context and keeps where the loop says they sit."""

    name: ClassVar[str] = "extra-tokens"
    k: int = 3

    def prepare(self, ctx):
        self.seen = []
        ctx.attention.add_score_tap(lambda layer, probs: self.seen.append(probs.shape[-1]) or probs)

    def inputs(self, ctx, step, branch, latents):
        dim = branch.context.shape[-1]
        return ModelInputs(extra_context=torch.zeros(latents.shape[0], self.k, dim, dtype=latents.dtype))

    def after(self, ctx, step, latents, eps):
        self.slices = dict(ctx.token_slices)
        return eps


def test_extra_context_tokens_are_appended_and_their_positions_reported(bundle):
    a, b = ExtraTokens(k=3), dataclasses.replace(ExtraTokens(k=2))
    b.name = "more-tokens"  # an instance name, so that the two report separately
    sample(bundle, GenerationRequest(prompt=PROMPT, steps=2, seed=1), [a, b], progress=False)
    t = bundle.tokenizer.model_max_length
    assert a.slices == {"text": slice(0, t), "extra-tokens": slice(t, t + 3), "more-tokens": slice(t + 3, t + 5)}
    assert set(a.seen) == {t + 5}  # every cross-attention layer saw the text and both controls' tokens


def _unet(class_embed_type: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    kwargs = {"projection_class_embeddings_input_dim": 4} if class_embed_type == "projection" else {}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",
                                "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4, class_embed_type=class_embed_type,
                                **kwargs).eval()  # fmt: skip


def test_class_labels_of_several_controls_go_through_the_networks_embedding_and_are_summed(bundle):
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 5, 16)
    identity = _unet("identity")  # time embedding dim 64: the labels are embeddings already
    denoiser = UNetDenoiser(identity, bundle.vae)
    a, b = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        both = denoiser(x, t, ModelInputs(context=context, class_labels=[a, b]))
        torch.testing.assert_close(both, identity(x, t, encoder_hidden_states=context, class_labels=a + b).sample)
        projection = UNetDenoiser(_unet("projection"), bundle.vae)
        a, b = torch.randn(2, 4), torch.randn(2, 4)
        summed_embeddings = projection(x, t, ModelInputs(context=context, class_labels=[a, b]))
        summed_labels = projection(x, t, ModelInputs(context=context, class_labels=[a + b]))
    assert not torch.allclose(summed_embeddings, summed_labels)  # a nonlinear embedding: E(a) + E(b) != E(a + b)
    assert "get_class_embed" not in projection.unet.__dict__  # the one-call override is gone
