"""Regional prompts (the `regional-prompt` control) on a tiny random model, and its attention mask by hand."""

import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, sample
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.controls import Schedule, control_from_dict
from mmsynth.sample.layout_guidance import LayoutGuidance
from mmsynth.sample.regional_prompts import RegionalPrompt, regional_attention
from mmsynth.sample.sampler import Context

PROMPT = "a red circle left of a blue square"
LEFT, RIGHT = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]


def _probs(n=1, heads=2, cells=4, t=7, seed=0):
    torch.manual_seed(seed)
    return torch.rand(n * heads, cells, t).softmax(-1)


def test_each_region_attends_to_its_own_tokens_inside_and_the_global_prompt_with_the_base_ratio():
    probs = _probs()  # 2x2 cells; tokens 0-2 the prompt, 3-4 region 0, 5-6 region 1
    weights = torch.zeros(1, 2, 2, 2)
    weights[0, 0, :, 0] = 1  # region 0: the left column
    weights[0, 1, 0, 1] = 1  # region 1: the top-right cell
    out = regional_attention(probs, slice(3, 7), 2, weights, base_ratio=0.25).reshape(2, 2, 2, 7)
    a = probs.reshape(2, 2, 2, 7)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, 2))
    assert bool((out[:, :, 1, 3:5] == 0).all())  # region 0's tokens: nothing outside the left column
    assert bool((out[:, 1, 0, 5:7] == 0).all()) and bool((out[:, :, 0, 5:7] == 0).all())  # region 1's: only top right
    glob = a[..., :3] / a[..., :3].sum(-1, keepdim=True)
    torch.testing.assert_close(out[:, :, 0, :3], 0.25 * glob[:, :, 0])  # inside: the base ratio for the prompt
    torch.testing.assert_close(out[:, :, 0, 3:5], 0.75 * a[:, :, 0, 3:5] / a[:, :, 0, 3:5].sum(-1, keepdim=True))
    torch.testing.assert_close(out[:, 1, 1, :3], glob[:, 1, 1])  # outside every region: the prompt alone
    uncond = regional_attention(probs, slice(3, 7), 2, weights, 0.25, uncond=True).reshape(2, 2, 2, 7)
    assert bool((uncond[..., 3:] == 0).all())
    torch.testing.assert_close(uncond[..., :3], glob)


def test_overlapping_regions_share_and_partial_cells_blend():
    probs = _probs(seed=1)
    weights = torch.zeros(1, 2, 2, 2)
    weights[0, :, 0, 0] = 1  # both regions cover the top-left cell
    weights[0, 0, 1, 1] = 0.5  # region 0 covers half of the bottom-right cell
    out = regional_attention(probs, slice(3, 7), 2, weights, base_ratio=0.0).reshape(2, 2, 2, 7)
    torch.testing.assert_close(out[:, 0, 0, 3:5].sum(-1), torch.full((2,), 0.5))
    torch.testing.assert_close(out[:, 0, 0, 5:7].sum(-1), torch.full((2,), 0.5))
    torch.testing.assert_close(out[:, 1, 1, 3:5].sum(-1), torch.full((2,), 0.5))
    torch.testing.assert_close(out[:, 1, 1, :3].sum(-1), torch.full((2,), 0.5))


def test_in_a_run_region_tokens_get_no_attention_outside_their_region(bundle):
    control = RegionalPrompt(regions=[LEFT, [0.5, 0.0, 1.0, 0.5]], prompts=["a green star", "a yellow triangle"])
    ctx = Context.create(bundle, GenerationRequest(prompt=PROMPT, n=2, seed=3, steps=4, cfg=3.0).validate(), [])
    ctx.controls = [control]
    control.prepare(ctx)
    seen = []
    ctx.attention.add_score_tap(lambda layer, p: seen.append((layer, list(ctx.attention.branches), p)) or p)
    ctx.attention.apply()
    try:
        with torch.no_grad():
            ctx.predict(ctx.noise(), ctx.make_step(0))
    finally:
        ctx.attention.remove()
        control.close(ctx)
    text = bundle.tokenizer.model_max_length
    assert ctx.token_slices["regional-prompt"] == slice(text, 3 * text)
    assert len(seen) == len(attention_modules(bundle.unet, "attn2"))
    for _, branches, p in seen:
        assert branches == ["uncond", "cond"]
        hw = p.shape[1]
        side = int(hw**0.5)
        a = p.reshape(2, 2, -1, side, side, p.shape[-1])  # branch x image*heads x ... x cells x tokens
        assert bool((a[0, ..., text:] == 0).all())  # the unconditional branch: the regions are silent
        if side >= 2:
            assert bool((a[1, ..., :, side // 2:, text: 2 * text] == 0).all())  # region 0 is the left half
            assert bool((a[1, ..., side // 2:, :, 2 * text:] == 0).all())  # region 1 the top right
            assert bool((a[1, ..., :, : side // 2, 2 * text:] == 0).all())
            assert a[1, ..., 0, 0, text: 2 * text].sum(-1).mean() == pytest.approx(0.8, abs=1e-4)


def test_sampling_changes_the_image_base_ratio_one_is_plain_and_the_unet_is_restored(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    req = GenerationRequest(prompt=PROMPT, n=2, seed=1, steps=3, cfg=3.0)
    plain = sample(bundle, req, progress=False)
    regional = sample(bundle, req, [RegionalPrompt(regions=[LEFT], prompts=["a green star"])], progress=False)
    assert not torch.allclose(regional.latents, plain.latents, atol=1e-3)
    base = sample(bundle, req, [RegionalPrompt(regions=[LEFT], prompts=["a green star"], base_ratio=1.0)],
                  progress=False)  # fmt: skip
    torch.testing.assert_close(base.latents, plain.latents, atol=1e-4, rtol=1e-4)  # the regions weigh nothing
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in m.__dict__ for m in attention_modules(bundle.unet, "attn2").values())
    assert not bundle.unet._forward_pre_hooks
    replay = sample(bundle, GenerationRequest.from_json(regional.requests[1].to_json()), progress=False)
    torch.testing.assert_close(replay.latents[0], regional.latents[1], atol=1e-5, rtol=1e-4)


def test_per_image_regions_give_each_image_as_alone_and_compose_with_layout_guidance(bundle):
    prompts = [PROMPT, "a blue square above a red circle"]
    regions = [[LEFT], [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0]]]
    texts = [["a green star"], ["a blue square", "a red circle"]]
    controls = [RegionalPrompt(regions=regions, prompts=texts, base_ratio=0.3),
                LayoutGuidance(boxes=[LEFT], phrases=["red circle"], eta=50.0, schedule=Schedule(end=0.5))]
    req = GenerationRequest(prompt=prompts, n=2, seed=4, steps=3, cfg=3.0)
    batch = sample(bundle, req, controls, progress=False)
    assert len(controls[1].history) == 1
    for i in range(2):
        one = batch.requests[i]
        assert one.controls[0]["regions"] == regions[i] and one.controls[0]["prompts"] == texts[i]
        alone = sample(bundle, GenerationRequest.from_json(one.to_json()), progress=False)
        torch.testing.assert_close(alone.latents[0], batch.latents[i], atol=1e-5, rtol=1e-4)


def test_the_control_round_trips_through_json():
    control = RegionalPrompt(regions=[LEFT, RIGHT], prompts=["a green star", "a red circle"], base_ratio=0.4,
                             schedule=Schedule(end=0.6))  # fmt: skip
    assert control_from_dict(control.to_dict()) == control


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"regions": [LEFT], "prompts": [""]}, "prompts must be a list of non-empty texts"),
    ({"regions": [LEFT], "prompts": "a green star"}, "prompts must be a list of non-empty texts"),
    ({"regions": [LEFT], "prompts": ["a", "b"]}, "1 regions but 2 prompts"),
    ({"regions": [[0.2, 0.0, 0.1, 1.0]], "prompts": ["a"]}, "0 <= x0 < x1 <= 1"),
    ({"regions": [[0.0, 0.0, 1.0, 1.2]], "prompts": ["a"]}, "0 <= y0 < y1 <= 1"),
    ({"regions": [LEFT] * 31, "prompts": ["a"] * 31}, "31 boxes; at most 30"),
    ({"regions": None, "prompts": []}, "prompts must be a list of non-empty texts"),
    ({"regions": [[LEFT]], "prompts": ["a"]}, "prompts per image too"),
    ({"regions": [LEFT], "prompts": ["a"], "base_ratio": 1.5}, r"base_ratio must be in \[0, 1\]"),
])
def test_bad_options_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        RegionalPrompt(**kwargs)


def test_a_wrong_batch_is_refused_and_the_unet_is_left_alone(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    with pytest.raises(InputError, match="2 region lists for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=PROMPT, n=3, steps=2),
               [RegionalPrompt(regions=[[LEFT], [RIGHT]], prompts=[["a"], ["b"]])], progress=False)  # fmt: skip
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
