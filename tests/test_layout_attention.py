"""Forward layout guidance on cross-attention (the `layout-attention` control) on a tiny random model."""

import numpy as np
import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, LayoutAttention, sample
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.layout_attention import box_coverage, mix_attention, phrase_positions

PROMPT = "a red circle left of a blue square"
LEFT = [0.0, 0.25, 0.5, 0.75]


def test_mixing_keeps_each_tokens_attention_mass_and_moves_the_asked_share_into_its_box():
    torch.manual_seed(0)
    b, heads, h, w, t = 2, 3, 4, 4, 5
    probs = torch.rand(b * heads, h * w, t).softmax(-1)
    strength = torch.zeros(b, t)
    strength[0, 2] = 0.75
    window = torch.zeros(b, t, 8, 8)  # given at twice the layer's resolution: resized by area
    window[0, 2, :, :4] = 1.0  # left half
    out = mix_attention(probs, strength, window).reshape(b, heads, h, w, t)
    before = probs.reshape(b, heads, h, w, t)
    torch.testing.assert_close(out.sum((2, 3)), before.sum((2, 3)))  # every token's total attention kept
    inside = lambda a: a[0, :, :, :2, 2].sum((1, 2)) / a[0, :, :, :, 2].sum((1, 2))  # noqa: E731
    torch.testing.assert_close(inside(out), 0.25 * inside(before) + 0.75)  # (1 - s) A + s g sum(A)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.equal(out.permute(0, 4, 1, 2, 3)[mask], before.permute(0, 4, 1, 2, 3)[mask])  # others untouched


def test_box_coverage_and_phrase_positions(bundle):
    cover = box_coverage([0.0, 0.0, 0.5, 0.375], 4, 4)
    torch.testing.assert_close(cover, torch.tensor([[1, 1, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.0]]))
    tok = bundle.tokenizer
    ids = tok(PROMPT).input_ids
    pos = phrase_positions(tok, PROMPT, "a blue square", "test")
    assert [ids[p] for p in pos] == tok("a blue square", add_special_tokens=False).input_ids
    assert pos[0] > 3  # the second "a", the one before "blue"
    with pytest.raises(InputError, match="phrase 'a green star' is not in the prompt"):
        phrase_positions(tok, PROMPT, "a green star", "test")


def test_layout_attention_moves_the_phrase_and_leaves_the_unet_as_it_was(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    req = GenerationRequest(prompt=PROMPT, n=2, seed=1, steps=3, cfg=3.0)
    plain = sample(bundle, req, progress=False)
    off = sample(bundle, req, [LayoutAttention(boxes=[LEFT], phrases=["a red circle"], strength=0.0)], progress=False)
    torch.testing.assert_close(off.latents, plain.latents, atol=1e-5, rtol=1e-4)  # classic processor == SDPA
    moved = sample(bundle, req, [LayoutAttention(boxes=[LEFT], phrases=["a red circle"], strength=0.9)],
                   progress=False)  # fmt: skip
    assert not torch.allclose(moved.latents, plain.latents, atol=1e-3)
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in m.__dict__ for m in attention_modules(bundle.unet, "attn2").values())
    assert not bundle.unet._forward_pre_hooks
    replay = sample(bundle, GenerationRequest.from_json(moved.requests[1].to_json()), progress=False)
    torch.testing.assert_close(replay.latents[0], moved.latents[1], atol=1e-5, rtol=1e-4)


def test_per_image_layouts_give_each_image_as_alone(bundle):
    prompts = [PROMPT, "a blue square above a red circle"]
    boxes = [[LEFT], [[0.25, 0.0, 0.75, 0.5], [0.25, 0.5, 0.75, 1.0]]]
    phrases = [["a red circle"], ["a blue square", "a red circle"]]
    req = GenerationRequest(prompt=prompts, n=2, seed=4, steps=3, cfg=3.0)
    batch = sample(bundle, req, [LayoutAttention(boxes=boxes, phrases=phrases, strength=0.8)], progress=False)
    for i in range(2):
        one = batch.requests[i]
        assert one.controls[0]["boxes"] == boxes[i] and one.controls[0]["phrases"] == phrases[i]
        alone = sample(bundle, GenerationRequest.from_json(one.to_json()), progress=False)
        torch.testing.assert_close(alone.latents[0], batch.latents[i], atol=1e-5, rtol=1e-4)


def test_layout_attention_composes_with_inpainting(bundle, gradient_image):
    from mmsynth.sample import BlendedInpaint

    mask = np.zeros(gradient_image.shape[:2], np.uint8)
    mask[:, : mask.shape[1] // 2] = 255
    controls = [BlendedInpaint(image=gradient_image, mask=mask),
                LayoutAttention(boxes=[[0.0, 0.0, 0.5, 1.0]], phrases=["a red circle"], strength=0.9)]
    out = sample(bundle, GenerationRequest(prompt=PROMPT, n=1, seed=0, steps=3), controls, progress=False)
    assert np.array_equal(out.images[0][:, mask.shape[1] // 2 + 2:], gradient_image[:, mask.shape[1] // 2 + 2:])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"boxes": [[0.5, 0, 0.2, 1]], "phrases": ["a red circle"]}, "0 <= x0 < x1 <= 1"),
    ({"boxes": [LEFT], "phrases": ["a red circle", "a blue square"]}, "1 boxes but 2 phrases"),
    ({"boxes": [LEFT], "phrases": [""]}, "non-empty strings"),
    ({"boxes": "left", "phrases": ["a red circle"]}, r"\[x0, y0, x1, y1\]"),
    ({"boxes": [LEFT], "phrases": ["a red circle"], "strength": 1.5}, r"strength must be in \[0, 1\]"),
    ({"boxes": [[LEFT]], "phrases": ["a red circle"]}, "phrases per image too"),
])
def test_bad_layouts_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        LayoutAttention(**kwargs)


def test_a_phrase_missing_from_the_prompt_or_a_wrong_batch_is_refused(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    with pytest.raises(InputError, match="'a green star' is not in the prompt"):
        sample(bundle, GenerationRequest(prompt=PROMPT, steps=2),
               [LayoutAttention(boxes=[LEFT], phrases=["a green star"])], progress=False)  # fmt: skip
    with pytest.raises(InputError, match="2 box lists for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=PROMPT, n=3, steps=2),
               [LayoutAttention(boxes=[[LEFT], [LEFT]], phrases=[["a red circle"], ["a red circle"]])],
               progress=False)  # fmt: skip
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
