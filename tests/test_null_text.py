"""Null-text inversion through the one loop: it rebuilds the source at cfg > 1, batches, replays, refuses misuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, InvertedLatents, NullTextInversion, edit_request, sample
from mmsynth.sample.sampler import Context

SOURCE = "a red circle"


@pytest.fixture(scope="module")
def image(gradient_image):
    return gradient_image


def _latents(bundle, request, controls):
    return sample(bundle, request, controls, progress=False, decode=False).latents


def test_tuned_null_text_rebuilds_the_source_at_cfg_5_better_than_plain_inversion(bundle, image, gradient_latents):
    request = GenerationRequest(prompt=SOURCE, steps=8, cfg=5.0)
    x0 = gradient_latents
    plain = _latents(bundle, request, [InvertedLatents(image=image, source_prompt=SOURCE)])
    control = NullTextInversion(image=image, source_prompt=SOURCE, inner_steps=10)
    tuned = _latents(bundle, request, [control])
    plain_err, tuned_err = (float((x - x0).pow(2).mean()) for x in (plain, tuned))
    assert tuned_err < 0.8 * plain_err  # the cfg-5 drift of plain inversion is what the tuning removes
    empty = Context.create(bundle, request, []).branches[0].context
    (_, embeddings), = control._tuned.values()
    assert sorted(embeddings) == list(range(8))  # one embedding per step, each moved from the empty prompt's
    assert all(not torch.allclose(e, empty) for e in embeddings.values())


def test_a_batch_tunes_each_image_as_alone(bundle, image):
    flipped = np.ascontiguousarray(image[::-1])
    prompts = [SOURCE, "a blue square"]
    request = GenerationRequest(prompt=prompts, steps=4, cfg=3.0, n=2)
    batch = _latents(bundle, request, [NullTextInversion(image=[image, flipped], source_prompt=prompts,
                                                         inner_steps=3)])  # fmt: skip
    for i, (im, p) in enumerate(zip([image, flipped], prompts)):
        alone = _latents(bundle, GenerationRequest(prompt=p, steps=4, cfg=3.0),
                         [NullTextInversion(image=im, source_prompt=p, inner_steps=3)])
        torch.testing.assert_close(batch[i: i + 1], alone, atol=1e-4, rtol=1e-4)


def test_a_null_text_edit_replays_from_its_json_and_composes_with_attention_replay(bundle, image):
    request = edit_request(image, SOURCE, "a blue circle", steps=4, cfg=3.0, null_text=2, keep_attention=0.5,
                           strength=0.75)
    assert [c["name"] for c in request.controls] == ["null-text-inversion", "source-attention"]
    assert request.negative_prompt == ""  # the tuning starts from the empty prompt
    first = sample(bundle, request, progress=False).latents
    replay = sample(bundle, GenerationRequest.from_json(request.to_json()), progress=False).latents
    torch.testing.assert_close(first, replay)


@pytest.mark.parametrize(("request_kwargs", "control_kwargs", "message"), [
    ({"scheduler": "dpmpp-2m"}, {}, "use scheduler 'ddim'"),
    ({"cfg": 1.0}, {}, "give cfg > 1"),
    ({}, {"inner_steps": 0}, "inner_steps must be an integer >= 1"),
    ({}, {"lr": -1.0}, "lr must be a number > 0"),
])
def test_null_text_inversion_refuses_what_it_cannot_tune(bundle, image, request_kwargs, control_kwargs, message):
    with pytest.raises(InputError, match=message):
        control = NullTextInversion(image=image, source_prompt=SOURCE, **control_kwargs)
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2, **{"cfg": 3.0, **request_kwargs}), [control],
               progress=False, decode=False)
    with pytest.raises(InputError, match="null_text"):
        edit_request(image, SOURCE, "a blue circle", null_text=-1)


def test_cli_edit_with_null_text_writes_a_replayable_request(bundle, image, tmp_path, tmp_path_factory):
    import json

    from PIL import Image

    from mmsynth.cli.main import main

    model = bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")
    Image.fromarray(image).save(tmp_path / "in.png")
    assert main(["edit", str(tmp_path / "in.png"), "--source-prompt", SOURCE, "--prompt", "a blue circle", "--steps",
                 "3", "--null-text", "2", "--model", str(model), "--out", str(tmp_path / "edit"), "--quiet"]) == 0
    controls = json.loads((tmp_path / "edit" / "request.json").read_text())["controls"]
    assert controls[0]["name"] == "null-text-inversion" and controls[0]["inner_steps"] == 2
    assert main(["generate", "--replay", str(tmp_path / "edit" / "request.json"), "--model", str(model), "--out",
                 str(tmp_path / "again"), "--quiet"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "0000.png")) for d in ("edit", "again"))
    assert np.array_equal(a, b)
    assert main(["edit", str(tmp_path / "in.png"), "--source-prompt", SOURCE, "--prompt", "a blue circle",
                 "--null-text", "2", "--cfg", "1", "--model", str(model), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
