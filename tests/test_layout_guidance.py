"""Backward layout guidance (the `layout-guidance` control) on a tiny random model, its energy by hand, and the
forward variant's smooth window (the `layout-attention` control)."""

from functools import partial

import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, LayoutAttention, sample
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.controls import Schedule, Step, control_from_dict
from mmsynth.sample.layout_attention import box_coverage, box_window
from mmsynth.sample.layout_guidance import LayoutGuidance, box_energy, resolve_layers
from mmsynth.sample.sampler import Context

PROMPT = "a red circle left of a blue square"
LEFT, RIGHT = [0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]


def _guidance(**kwargs):
    return LayoutGuidance(**{"boxes": [LEFT, RIGHT], "phrases": ["red circle", "blue square"], **kwargs})


def test_box_energy_is_the_mean_over_heads_and_tokens_of_one_minus_the_in_box_share_squared():
    torch.manual_seed(0)
    n, heads, h, w, t = 2, 3, 2, 2, 5
    probs = torch.rand(n * heads, h * w, t).softmax(-1)
    left = box_coverage([0.0, 0.0, 0.5, 1.0], h, w)  # the left column
    objects = [[([1, 2], left)], [([3], 1.0 - left)]]
    energy = box_energy(probs, n, h, w, objects)
    a = probs.reshape(n, heads, h, w, t)
    share0 = a[0, :, :, 0, 1:3].sum(1) / a[0, :, :, :, 1:3].sum((1, 2))  # heads x 2 tokens
    share1 = a[1, :, :, 1, 3].sum(1) / a[1, :, :, :, 3].sum((1, 2))
    torch.testing.assert_close(energy, torch.stack([((1 - share0) ** 2).mean(), ((1 - share1) ** 2).mean()]))
    inside = torch.zeros(1, 4, 2)
    inside[0, 0, 1] = inside[0, 2, 1] = 0.5  # all of token 1's attention in the left column
    inside[..., 0] = 1 - inside[..., 1]
    assert box_energy(inside, 1, 2, 2, [[([1], left)]]).item() == pytest.approx(0.0)


def test_layers_resolve_to_diffusers_blocks_or_name_substrings(bundle):
    names = list(attention_modules(bundle.unet, "attn2"))
    default = resolve_layers(bundle.unet, "mid,up1", "t")
    assert default == [m for m in names if m.startswith("mid_block.")] + \
        [m for m in names if m.startswith("up_blocks.1.")]  # fmt: skip
    assert resolve_layers(bundle.unet, ["up0"], "t") == [m for m in names if m.startswith("up_blocks.0.")]
    assert resolve_layers(bundle.unet, ["down_blocks.2"], "t") == [m for m in names if "down_blocks.2" in m]
    with pytest.raises(InputError, match=r"layers entry 'up2' selects no cross-attention layer.*down1, down2, mid"):
        resolve_layers(bundle.unet, "mid,up2", "layout-guidance")


def _context(bundle, control, prompt=PROMPT, n=2):
    ctx = Context.create(bundle, GenerationRequest(prompt=prompt, n=n, seed=3, steps=10, cfg=3.0).validate(), [])
    ctx.controls = [control]
    control.prepare(ctx)
    ctx.attention.apply()  # what the loop does once every control has prepared
    ctx.latents = ctx.noise()
    return ctx


def test_each_iteration_lowers_the_energy_and_reads_only_the_chosen_layers(bundle):
    for layers, prefixes in (("mid,up1", ("mid_block.", "up_blocks.1.")), ("mid", ("mid_block.",))):
        control = _guidance(eta=300.0, iterations=4, threshold=0.0, layers=layers)
        ctx = _context(bundle, control)
        try:
            step = ctx.make_step(0)
            moved = control.before(ctx, step, ctx.latents, partial(ctx.predict, step=step))
        finally:
            ctx.attention.remove()
            control.close(ctx)
        energies = torch.tensor(control.history[0]["energies"])  # iterations x images
        assert energies.shape == (4, 2) and control.history[0]["step"] == 0
        assert bool((energies[1:] < energies[:-1]).all())  # every update lowered every image's energy
        assert not moved.requires_grad and not torch.equal(moved, ctx.latents)
        expected = [m for m in attention_modules(bundle.unet, "attn2") if m.startswith(prefixes)]
        assert sorted(control.recorded_layers) == sorted(expected)
        assert ctx.state["layout-guidance"] is control.history


def test_the_step_is_the_references_in_its_sigma_space():
    control = _guidance(eta=30.0)
    vp = Step(0, 50, torch.tensor(981), 0.0047, 0.006)
    assert control.step_factor(vp) == pytest.approx(30.0 * (1 - 0.0047))  # eta * sigma^2 * abar on VP latents
    euler = Step(0, 50, torch.tensor(981), 0.0047, 0.006, input_scale=0.0047**0.5)
    assert control.step_factor(euler) == pytest.approx(30.0 * euler.sigma**2)  # eta * sigma^2 on sigma-space latents


def test_an_energy_below_the_threshold_stops_at_once(bundle):
    control = _guidance(threshold=1.0)
    ctx = _context(bundle, control)
    try:
        step = ctx.make_step(0)
        moved = control.before(ctx, step, ctx.latents, partial(ctx.predict, step=step))
    finally:
        ctx.attention.remove()
    assert torch.equal(moved, ctx.latents) and len(control.history[0]["energies"]) == 1


def test_special_tokens_add_the_start_and_end_tokens(bundle):
    plain, special = _guidance(), _guidance(special_tokens=True)
    ctx = _context(bundle, plain, n=1)
    ctx.attention.remove()
    ctx2 = _context(bundle, special, n=1)
    ctx2.attention.remove()
    end = bundle.tokenizer(PROMPT).input_ids.index(bundle.tokenizer.eos_token_id)
    assert [o[0] for o in plain._objects[0]] == [o[0] for o in special._objects[0]][:2]
    assert [(o[0], o[2]) for o in special._objects[0][2:]] == [([end], False), ([0], True)]


def test_sampling_guides_restores_the_unet_and_replays_per_image(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    prompts = [PROMPT, "two red circles"]
    boxes = [[LEFT, RIGHT], [LEFT, RIGHT]]
    phrases = [["red circle", "blue square"], ["red circle", "red circle"]]  # one object with two boxes
    req = GenerationRequest(prompt=prompts, n=2, seed=1, steps=5, cfg=3.0)
    plain = sample(bundle, req, progress=False)
    control = LayoutGuidance(boxes=boxes, phrases=phrases, eta=100.0)
    guided = sample(bundle, req, [control], progress=False)
    assert not torch.allclose(guided.latents, plain.latents, atol=1e-3)
    assert [h["step"] for h in control.history] == [0]  # the first 20% of 5 steps
    assert len(control._objects[1]) == 1 and len(control._objects[1][0][1]) == 2
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in m.__dict__ for m in attention_modules(bundle.unet, "attn2").values())
    assert not bundle.unet._forward_pre_hooks
    one = guided.requests[1]
    assert one.controls[0]["schedule"]["end"] == 0.2
    assert one.controls[0]["boxes"] == boxes[1] and one.controls[0]["phrases"] == phrases[1]
    alone = sample(bundle, GenerationRequest.from_json(one.to_json()), progress=False)
    torch.testing.assert_close(alone.latents[0], guided.latents[1], atol=1e-5, rtol=1e-4)


def test_the_control_round_trips_through_json():
    control = _guidance(eta=12.5, iterations=3, threshold=0.1, layers=["mid", "up1"], special_tokens=True,
                        schedule=Schedule(end=0.3))  # fmt: skip
    again = control_from_dict(control.to_dict())
    assert isinstance(again, LayoutGuidance) and again == control


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"boxes": [[0.5, 0, 0.2, 1]], "phrases": ["red circle"]}, "0 <= x0 < x1 <= 1"),
    ({"boxes": [[0, 0, 1, 1.5]], "phrases": ["red circle"]}, "0 <= y0 < y1 <= 1"),
    ({"boxes": [LEFT] * 31, "phrases": ["red circle"] * 31}, "31 boxes; at most 30"),
    ({"boxes": [LEFT], "phrases": ["red circle", "blue square"]}, "1 boxes but 2 phrases"),
    ({"boxes": [LEFT], "phrases": [""]}, "non-empty strings"),
    ({"boxes": [[LEFT]], "phrases": ["red circle"]}, "phrases per image too"),
    ({"iterations": 0}, r"iterations must be an integer in 1\.\.100"),
    ({"iterations": 101}, r"iterations must be an integer in 1\.\.100"),
    ({"iterations": 2.5}, r"iterations must be an integer in 1\.\.100"),
    ({"eta": -1}, "eta must be a number >= 0"),
    ({"threshold": 1.5}, r"threshold must be in \[0, 1\]"),
    ({"layers": ""}, "layers must be"),
    ({"layers": []}, "layers must be"),
    ({"special_tokens": 1}, "special_tokens must be true or false"),
])
def test_bad_options_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        _guidance(**kwargs)


def test_missing_phrases_a_missing_block_or_a_wrong_batch_are_refused(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    req = GenerationRequest(prompt=PROMPT, steps=2)
    with pytest.raises(InputError, match="phrase 'green star' is not in the prompt"):
        sample(bundle, req, [LayoutGuidance(boxes=[LEFT], phrases=["green star"])], progress=False)
    with pytest.raises(InputError, match="phrases 'green star', 'yellow triangle' are not in the prompt"):
        sample(bundle, req, [LayoutGuidance(boxes=[LEFT, RIGHT, LEFT], phrases=["green star", "red circle",
                                                                                "yellow triangle"])],
               progress=False)  # fmt: skip
    with pytest.raises(InputError, match="layers entry 'up2'"):
        sample(bundle, req, [_guidance(layers="up2")], progress=False)
    with pytest.raises(InputError, match="2 box lists for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=PROMPT, n=3, steps=2),
               [LayoutGuidance(boxes=[[LEFT], [LEFT]], phrases=[["red circle"], ["red circle"]])], progress=False)
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before


# ---- the forward variant (layout-attention): its window, its plural-aware phrases
def test_the_forward_window_is_the_coverage_or_a_smooth_falloff_outside_the_box():
    box = [0.25, 0.25, 0.5, 0.5]
    torch.testing.assert_close(box_window(box, 8, 8), box_coverage(box, 8, 8))
    smooth = box_window(box, 8, 8, softness=0.1)
    assert bool((smooth[2:4, 2:4] == 1).all())  # inside: the peak
    assert bool((smooth > box_coverage(box, 8, 8)).any()) and bool((smooth > 0).all())
    assert smooth[3, 4] > smooth[3, 5] > smooth[3, 7]  # decays with the distance to the box
    with pytest.raises(InputError, match=r"softness must be in \[0, 1\]"):
        LayoutAttention(boxes=[box], phrases=["red circle"], softness=-1)


def test_forward_guidance_finds_plural_phrases_and_smooth_windows_act(bundle):
    req = GenerationRequest(prompt="two red circles", n=1, seed=2, steps=2, cfg=3.0)
    hard = sample(bundle, req, [LayoutAttention(boxes=[LEFT], phrases=["red circle"], strength=0.9)], progress=False)
    soft = sample(bundle, req, [LayoutAttention(boxes=[LEFT], phrases=["red circle"], strength=0.9, softness=0.2)],
                  progress=False)  # fmt: skip
    assert not torch.allclose(hard.latents, soft.latents, atol=1e-4)
