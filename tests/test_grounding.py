"""TokenCompose's token grounding loss: caption words -> their objects' masks, the loss, the recorder."""

from __future__ import annotations

import numpy as np
import torch

from mmsynth.data import vocab
from mmsynth.data.captions import captions, parse_caption
from mmsynth.data.render import render_scene
from mmsynth.data.scene import sample_scene
from mmsynth.models.zoo import tiny_bundle
from mmsynth.train.grounding import CrossAttentionRecorder, group_masks, token_grounding_loss, token_groups


def _scene(wanted):
    return next(s for s in (sample_scene("train", i) for i in range(100)) if wanted(s))


def _offsets(tokenizer, caps):
    return tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_offsets_mapping=True).offset_mapping  # fmt: skip


def test_group_masks_are_the_renders_visible_coverage_of_each_colour_shape_group():
    scene = _scene(lambda s: len(s.objects) >= 3 and len({(o.color, o.shape) for o in s.objects}) < len(s.objects))
    coverage = render_scene(scene, 64).coverage
    masks = group_masks(scene, 64)
    assert len(masks) < len(scene.objects)  # a group of two or more objects shares one mask
    for key, mask in masks.items():
        want = sum(c for c, o in zip(coverage, scene.objects) if (o.color, o.shape) == key)
        np.testing.assert_allclose(mask, want, atol=1e-6)
    assert np.max(sum(masks.values())) <= 1.0 + 1e-6  # occlusion respected: no pixel is covered twice


def test_token_groups_ground_every_word_of_a_group_phrase():
    tokenizer = tiny_bundle(seed=1).tokenizer
    scene = _scene(lambda s: len({(o.color, o.shape) for o in s.objects}) >= 2)
    caption = captions(scene, 1)[0]
    caps = [caption, "", "a mauve blob"]  # dropped caption and one outside the grammar ground nothing
    masks, token_group = token_groups(caps, [scene.to_dict(), scene.to_dict(), None], _offsets(tokenizer, caps))
    parsed, by_key = parse_caption(caption), group_masks(scene)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
    for tok, g in zip(tokens, token_group[0].tolist()):
        if tok in vocab.COLORS:
            assert parsed.groups[g].color == tok
        elif tok in vocab.SHAPES or tok in vocab.SHAPE_PLURALS.values():
            assert tok in (parsed.groups[g].shape, vocab.SHAPE_PLURALS[parsed.groups[g].shape])
        elif tok in ("of", "left", "right", "above", "below", "over", "under", "with", ",", "<|startoftext|>"):
            assert g == -1, tok
    for g, group in enumerate(parsed.groups):
        assert torch.equal(masks[0, g], torch.from_numpy(by_key[(group.color, group.shape)]))
    assert (token_group[1:] == -1).all()
    assert masks[0].sum() > 0 and masks[1:].sum() == 0


def test_token_grounding_loss_is_zero_inside_one_outside_and_ignores_ungrounded_tokens():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2] = 1.0  # the top half
    token_group = torch.tensor([[-1, 0, 0]])
    probs = torch.zeros(2, 16, 3)  # batch 1 x 2 heads, 4x4 pixels, 3 tokens
    probs[:, :8, 1] = 1.0 / 8  # token 1: all its attention inside
    probs[:, 8:, 2] = 1.0 / 8  # token 2: all outside
    probs[:, :, 0] = 1.0  # token 0 is not grounded: anything goes
    loss = token_grounding_loss([probs], masks, token_group)
    assert loss.item() == 0.5  # mean of (1 - 1)^2 and (1 - 0)^2
    assert token_grounding_loss([probs], masks, torch.full((1, 3), -1)).item() == 0.0


def test_token_grounding_loss_pools_wide_masks_to_the_layers_wide_grid():
    masks = torch.zeros(1, 1, 4, 8)  # a 4 x 8 image; its layer is 2 x 4 = 8 cells
    masks[0, 0, :, :4] = 1.0  # the left half
    probs = torch.zeros(1, 8, 2)
    probs[0, [0, 1, 4, 5], 0] = 0.25  # token 0: the left half of both rows of the 2 x 4 grid
    probs[0, [2, 3, 6, 7], 1] = 0.25  # token 1: the right half
    assert token_grounding_loss([probs], masks, torch.tensor([[0, -1]])).item() == 0.0
    assert token_grounding_loss([probs], masks, torch.tensor([[-1, 0]])).item() == 1.0


def test_recorder_keeps_every_cross_attention_map_with_its_graph_and_restores_the_processors():
    bundle = tiny_bundle(seed=1)
    unet = bundle.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    recorder = CrossAttentionRecorder(unet)
    text = torch.randn(2, bundle.tokenizer.model_max_length, unet.config.cross_attention_dim)
    x = torch.randn(2, 4, 8, 8)
    with recorder.record() as maps:
        unet(x, torch.tensor([5, 5]), encoder_hidden_states=text)
    unet(x, torch.tensor([5, 5]), encoder_hidden_states=text)  # outside the block: nothing kept
    n_cross = sum(1 for name, _ in unet.named_modules() if name.endswith("attn2"))
    assert len(maps) == n_cross and all(m.requires_grad and m.shape[-1] == text.shape[1] for m in maps)
    assert torch.allclose(maps[0].sum(-1), torch.ones(()))  # probabilities over the text tokens
    recorder.remove()
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
