"""Best-of-K sampling (GenerationRequest.best_of, `mmsynth generate --best-of`) on a tiny random model."""

import dataclasses
import json

import numpy as np
import pytest

from mmsynth.errors import InputError
from mmsynth.sample import GenerationRequest, sample
from mmsynth.sample.best_of import CANDIDATE_STRIDE, candidate_seed, clip_distances

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def request_k3():
    return GenerationRequest(prompt=PROMPTS, n=2, seed=5, steps=2, cfg=3.0, best_of=3)


def test_each_image_is_its_clip_closest_candidate_and_candidate_0_is_plain_sampling(bundle, request_k3):
    result = sample(bundle, request_k3, progress=False)
    plain = dataclasses.replace(request_k3, best_of=1)
    candidates = [sample(bundle, dataclasses.replace(plain, seed=candidate_seed(5, j)), progress=False)
                  for j in range(3)]  # fmt: skip
    dist = np.stack([clip_distances(bundle, c.images, PROMPTS) for c in candidates])  # 3 x 2
    assert len({tuple(d) for d in dist.T.round(6)}) == 2 and np.ptp(dist, axis=0).min() > 0  # a real choice
    for i, sel in enumerate(result.selection):
        j = int(dist[:, i].argmin())
        assert sel["chosen"] == j and sel["best_of"] == 3
        assert sel["clip_distance"] == pytest.approx(dist[:, i].tolist(), abs=1e-5)
        assert sel["seed"] == 5 + i + j * CANDIDATE_STRIDE
        np.testing.assert_array_equal(result.images[i], candidates[j].images[i])
        np.testing.assert_allclose(result.latents[i].numpy(), candidates[j].latents[i].numpy())
    assert sample(bundle, plain, progress=False).selection is None
    np.testing.assert_array_equal(sample(bundle, plain, progress=False).images, candidates[0].images)


def test_a_per_image_request_replays_the_same_pick(bundle, request_k3):
    result = sample(bundle, request_k3, progress=False)
    req = result.requests[1]
    assert (req.seed, req.best_of, req.prompt) == (6, 3, PROMPTS[1])
    alone = sample(bundle, GenerationRequest.from_json(req.to_json()), progress=False)
    assert alone.selection[0]["chosen"] == result.selection[1]["chosen"]
    assert np.abs(alone.images[0].astype(int) - result.images[1].astype(int)).max() <= 1


def test_bad_best_of_requests_say_what_is_wrong(bundle):
    from mmsynth.models.zoo import tiny_bundle

    for k in (0, 65, 2.5, True):
        with pytest.raises(InputError, match="best_of must be an integer in \\[1, 64\\]"):
            GenerationRequest(prompt="a red circle", best_of=k).validate()
    with pytest.raises(InputError, match="image 1 has an empty prompt"):
        sample(bundle, GenerationRequest(prompt=["a red circle", ""], n=2, steps=1, best_of=2), progress=False)
    with pytest.raises(InputError, match="too large for best_of 2"):
        sample(bundle, GenerationRequest(prompt="a red circle", seed=2**63 - 10, steps=1, best_of=2), progress=False)
    no_clip = tiny_bundle(seed=0)
    no_clip.clip = None
    with pytest.raises(InputError, match="has none \\(clip/ folder\\)"):
        sample(no_clip, GenerationRequest(prompt="a red circle", steps=1, best_of=2), progress=False)
    old = {k: v for k, v in GenerationRequest(prompt="a red circle").to_dict().items() if k != "best_of"}
    assert GenerationRequest.from_dict(old).best_of == 1  # requests saved before best_of still load


def test_cli_best_of_records_the_pick_and_rejects_bad_k(bundle, tmp_path, capsys):
    from mmsynth.cli.main import main

    model = bundle.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "a red circle", "-n", "2", "--steps", "1", "--model", str(model), "--quiet"]
    assert main([*argv, "--best-of", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["best_of"]["best_of"] for r in rows] == [2, 2] and all(len(r["best_of"]["clip_distance"]) == 2
                                                                        for r in rows)  # fmt: skip
    assert json.loads((out / "requests" / "0001.json").read_text())["best_of"] == 2
    capsys.readouterr()
    assert main([*argv, "--best-of", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--best-of: must be an integer in [1, 64]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bench_rows_pass_best_of_to_the_sampler():
    from mmsynth.evaluate.bench.generation import SamplerSettings
    from mmsynth.evaluate.bench.runner import parse_sweep
    from mmsynth.evaluate.bench.t2i import SUITE

    settings = SamplerSettings().with_overrides(SUITE.rows["best_of"].settings())
    assert settings.best_of == 4 and isinstance(settings.best_of, int)
    assert parse_sweep("best_of=1,2,4") == ("best_of", [1.0, 2.0, 4.0])
    with pytest.raises(InputError, match="best_of must be whole numbers in \\[1, 64\\]"):
        parse_sweep("best_of=0,2")


def test_shared_candidates_draw_each_candidate_once_and_pick_as_alone(bundle, request_k3, monkeypatch):
    import mmsynth.sample.sampler as sampler_module
    from mmsynth.sample.best_of import shared_candidates

    alone = sample(bundle, request_k3, progress=False)
    seeds = []
    real = sampler_module.run_loop  # each candidate is one run of the loop
    monkeypatch.setattr(sampler_module, "run_loop",
                        lambda b, r, c, **kw: seeds.append(r.seed) or real(b, r, c, **kw))
    with shared_candidates() as draws:
        sample(bundle, dataclasses.replace(request_k3, best_of=2), progress=False)
        with shared_candidates():  # a nested block shares the outer one's draws
            shared = sample(bundle, request_k3, progress=False)
    assert seeds == [candidate_seed(5, j) for j in range(3)]  # K = 3 drew only the candidate K = 2 had not
    assert draws.reused == 2 and len(draws.draws) == 3
    assert shared.selection == alone.selection
    np.testing.assert_array_equal(shared.images, alone.images)
    sample(bundle, dataclasses.replace(request_k3, best_of=2), progress=False)  # outside: nothing kept
    assert seeds[3:] == [candidate_seed(5, j) for j in range(2)]


def test_each_image_records_its_own_per_image_options(bundle, gradient_image):
    from mmsynth.sample import Img2Img
    from mmsynth.sample.controls import decode_array

    flipped = np.ascontiguousarray(gradient_image[::-1])
    request = GenerationRequest(prompt=PROMPTS, n=2, seed=5, steps=2, cfg=3.0, best_of=2)
    result = sample(bundle, request, [Img2Img(image=[gradient_image, flipped], strength=0.5)], progress=False)
    for i, expected in enumerate((gradient_image, flipped)):
        recorded = result.requests[i].controls[0]["image"]
        np.testing.assert_array_equal(decode_array(recorded, "image")[..., :3], expected)
