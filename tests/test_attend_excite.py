"""Attend-and-Excite (the `attend-excite` control) on a tiny random model, and its pieces by hand."""

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.sample import AttendExcite, GenerationRequest, sample
from mmsynth.sample.attend_excite import excite_loss, max_attention, subject_positions
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.controls import Step
from mmsynth.sample.sampler import Context

PROMPT = "a red circle and a blue square"


def test_max_attention_renormalises_the_prompts_tokens_and_takes_each_subjects_peak():
    torch.manual_seed(0)
    n, h, w, t = 2, 3, 3, 6
    maps = torch.rand(n, h, w, t).softmax(-1)
    ends = torch.tensor([4, 3])  # image 0: tokens 1..3 are its prompt; image 1: tokens 1..2
    peaks = max_attention(maps, ends, [[1, 3], [2]], sigma=0.0)
    for i, (end, subjects) in enumerate(zip(ends.tolist(), [[1, 3], [2, 2]])):  # a short list repeats its first
        probs = torch.softmax(100 * maps[i, :, :, 1:end], dim=-1)  # the start token and the padding left out
        expected = torch.stack([probs[..., s - 1].max() for s in subjects])
        torch.testing.assert_close(peaks[i], expected)
    assert excite_loss(torch.tensor([[0.9, 0.2], [1.0, 1.0]])).tolist() == pytest.approx([0.8, 0.0])


def test_smoothing_is_the_reference_codes_gaussian():
    try:
        from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (  # noqa: E501
            GaussianSmoothing,
        )
    except ImportError:
        pytest.skip("this diffusers has no Attend-and-Excite pipeline to compare with")
    torch.manual_seed(1)
    maps = torch.rand(1, 4, 4, 3) * 0.02  # small differences: a softmax of 100x them is far from one-hot
    peaks = max_attention(maps, torch.tensor([3]), [[1]], sigma=0.5)
    probs = torch.softmax(100 * maps[0, :, :, 1:3], dim=-1)[..., 0]
    padded = torch.nn.functional.pad(probs[None, None], (1, 1, 1, 1), mode="reflect")
    torch.testing.assert_close(peaks[0, 0], GaussianSmoothing()(padded).max())


def test_subjects_are_the_groups_nouns_or_the_given_words(bundle):
    tok = bundle.tokenizer
    ids = tok("two red circles left of a blue square").input_ids
    words = [tok.convert_ids_to_tokens(ids[p]) for p in
             subject_positions(tok, "two red circles left of a blue square", None, "t")]  # fmt: skip
    assert words == ["circles", "square"]
    back = "a red circle and a blue square, with the red circle left of the blue square"
    assert len(subject_positions(tok, back, None, "t")) == 2  # the back-references are not new subjects
    given = subject_positions(tok, PROMPT, ["blue square"], "t")
    assert [tok.convert_ids_to_tokens(tok(PROMPT).input_ids[p]) for p in given] == ["blue", "square"]
    with pytest.raises(InputError, match=r"not a Shapes caption.*give tokens"):
        subject_positions(tok, "circle red blue", None, "attend-excite")
    with pytest.raises(InputError, match="'green' is not in the prompt"):
        subject_positions(tok, PROMPT, ["green"], "attend-excite")


def _context(bundle, prompt=PROMPT, n=2, control=None):
    ctx = Context.create(bundle, GenerationRequest(prompt=prompt, n=n, seed=3, steps=10, cfg=3.0).validate(), [])
    control = control or AttendExcite()
    ctx.controls = [control]
    control.prepare(ctx)
    ctx.attention.apply()  # what the loop does once every control has prepared
    ctx.latents = ctx.noise()
    return ctx, control


def test_the_update_raises_the_most_neglected_subjects_attention(bundle):
    ctx, control = _context(bundle, control=AttendExcite(step_size=20.0, refine=[[0.0, 0.9]], max_refinement=10))
    try:
        step = ctx.make_step(0)
        predict = lambda z, branch=None: ctx.predict(z, step, branch=branch)  # noqa: E731
        loss0, grad, peaks0 = control.measure(ctx.latents, predict)
        assert peaks0.shape == (2, 2) and bool((loss0 > 0).all()) and grad.abs().sum() > 0
        moved = control.before(ctx, step, ctx.latents, predict)
        loss1, _, _ = control.measure(moved, predict)
        assert bool((loss1 < loss0).all())  # every image's weakest subject gained attention
        assert not moved.requires_grad
    finally:
        ctx.attention.remove()
        control.close(ctx)


def test_the_softmax_spans_the_prompt_or_also_the_end_and_padding_tokens(bundle):
    peaks = {}
    for tokens in ("prompt", "all"):
        ctx, control = _context(bundle, control=AttendExcite(softmax_tokens=tokens))
        try:
            predict = partial(ctx.predict, step=ctx.make_step(0))
            _, _, peaks[tokens] = control.measure(ctx.latents, predict)
            ends = control._ends.tolist()
        finally:
            ctx.attention.remove()
        prompt_end = bundle.tokenizer(PROMPT).input_ids.index(bundle.tokenizer.eos_token_id)
        assert ends == ([prompt_end] * 2 if tokens == "prompt" else [bundle.tokenizer.model_max_length - 1] * 2)
    assert bool((peaks["all"] <= peaks["prompt"] + 1e-6).all())  # more tokens share the softmax: lower peaks
    assert not torch.allclose(peaks["all"], peaks["prompt"])


def test_sampling_moves_the_latents_restores_the_unet_and_replays(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    req = GenerationRequest(prompt=PROMPT, n=2, seed=1, steps=4, cfg=3.0)
    plain = sample(bundle, req, progress=False)
    excited = sample(bundle, req, [AttendExcite()], progress=False)
    assert not torch.allclose(excited.latents, plain.latents, atol=1e-3)
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in m.__dict__ for m in attention_modules(bundle.unet, "attn2").values())
    assert excited.requests[1].controls[0]["schedule"]["end"] == 0.5  # the paper's first half of the steps
    replay = sample(bundle, GenerationRequest.from_json(excited.requests[1].to_json()), progress=False)
    torch.testing.assert_close(replay.latents[0], excited.latents[1], atol=1e-5, rtol=1e-4)


def test_per_image_words_give_each_image_as_alone(bundle):
    prompts = [PROMPT, "two green stars"]
    tokens = [["circle", "square"], ["stars"]]
    req = GenerationRequest(prompt=prompts, n=2, seed=4, steps=3, cfg=3.0)
    batch = sample(bundle, req, [AttendExcite(tokens=tokens)], progress=False)
    for i in range(2):
        one = batch.requests[i]
        assert one.controls[0]["tokens"] == tokens[i]
        alone = sample(bundle, GenerationRequest.from_json(one.to_json()), progress=False)
        torch.testing.assert_close(alone.latents[0], batch.latents[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"step_size": 0}, "step_size must be a number > 0"),
    ({"refine": [[1.0, 0.5]]}, "refine must be a list of"),
    ({"refine": [[0.0, 0.0]]}, "refine must be a list of"),
    ({"max_refinement": -1}, "max_refinement must be an integer >= 0"),
    ({"smoothing": -0.5}, "smoothing must be a number >= 0"),
    ({"resolution": 0}, "resolution must be an integer >= 1"),
    ({"tokens": []}, "tokens must be a non-empty list"),
    ({"softmax_tokens": "eot"}, "softmax_tokens must be one of prompt, all"),
    ({"tokens": [["circle"], []]}, "tokens must be a non-empty list"),
])
def test_bad_options_raise_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        AttendExcite(**kwargs)


def test_a_resolution_the_unet_lacks_or_a_wrong_batch_is_refused(bundle):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    with pytest.raises(InputError, match=r"resolution 3 is not an attention level.*valid: 8, 4, 2"):
        sample(bundle, GenerationRequest(prompt=PROMPT, steps=2), [AttendExcite(resolution=3)], progress=False)
    with pytest.raises(InputError, match="2 token lists for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=PROMPT, n=3, steps=2), [AttendExcite(tokens=[["red"], ["blue"]])],
               progress=False)  # fmt: skip
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before


def test_step_size_follows_the_papers_ramp():
    control = AttendExcite(step_size=20.0)
    first, last = (Step(i, 5, torch.tensor(0), 0.5, 0.5) for i in (0, 4))
    assert control.step_size_at(first) == pytest.approx(20.0)
    assert control.step_size_at(last) == pytest.approx(20.0 * math.sqrt(0.5))


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def _cli(argv):
    from mmsynth.cli.main import main

    return main(argv)


def test_cli_excite_writes_a_replayable_request(model_dir, tmp_path):
    argv = ["generate", "--prompt", PROMPT, "--steps", "3", "-n", "1", "--excite", "circle,square", "--excite-step",
            "10", "--excite-end", "0.4", "--model", str(model_dir), "--quiet"]
    assert _cli([*argv, "--out", str(tmp_path / "a")]) == 0
    control = json.loads((tmp_path / "a" / "request.json").read_text())["controls"][0]
    assert (control["name"], control["tokens"], control["step_size"]) == ("attend-excite", ["circle", "square"], 10.0)
    assert control["schedule"]["end"] == 0.4
    assert _cli(["generate", "--replay", str(tmp_path / "a" / "request.json"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "0000.png")) for d in "ab")
    assert np.array_equal(a, b)


@pytest.mark.parametrize(("extra", "message"), [
    (["--excite-step", "5"], "--excite-step needs --excite"),
    (["--excite", "auto", "--excite-end", "0"], "--excite-end must be in"),
    (["--excite", "auto", "--excite-step", "-1"], "--excite-step: must be a number > 0"),
    (["--excite", "green"], "'green' is not in the prompt"),
    (["--excite", ","], "--excite must name words"),
])
def test_cli_bad_excite_options_exit_2_with_no_output(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["generate", "--prompt", PROMPT, "--steps", "1", "--model", str(model_dir), "--out", str(out), "--quiet",
            *extra]
    assert _cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
