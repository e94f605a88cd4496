"""The experiment probes in experiments/probes/ (not product commands: scripts whose findings the experiment log,
docs/experiments/, records) still run on a tiny bundle, so a finding can be rerun as the log gives it."""

import importlib
import importlib.util
from pathlib import Path

import pytest

PROBES = Path(__file__).resolve().parents[1] / "experiments" / "probes"


def _probe(name: str):
    """experiments/probes/NAME.py as a module (the probes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, PROBES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_tower_probe_script(tmp_path, capsys):
    import shutil

    from mmsynth.models.zoo import tiny_bundle

    probe = _probe("text_tower_probe")
    tiny_bundle(seed=0).save_pretrained(tmp_path / "m")
    cos = probe.probe(str(tmp_path / "m"), "a red circle left of a blue square", {"same": "a red circle left of a "
                      "blue square", "other": "two green stars"})  # fmt: skip
    assert abs(cos["same"] - 1) < 1e-5 and -1 <= cos["other"] < 1 - 1e-4
    tokens = probe.token_cosines(str(tmp_path / "m"), "a red circle left of a blue square",
                                 {"same": "a red circle left of a blue square", "flipped": "a red circle right of a "
                                  "blue square"})  # fmt: skip
    assert abs(tokens["same"] - 1) < 1e-5 and tokens["flipped"] < 1 - 1e-4  # a random tower keeps the word
    readout = probe.relation_readout(str(tmp_path / "m"), n=200)
    assert 0 <= readout["relation_readout"] <= 1 and readout["flip_size"] > 0  # a random tower: the word changes h
    assert probe.main(["--model", str(tmp_path / "m"), "--n", "200"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(probe.VARIANTS) + 2  # the header, the readout
    shutil.rmtree(tmp_path / "m" / "clip")  # a UNet run's export with its own text encoder: token cosines only
    assert probe.main(["--model", str(tmp_path / "m"), "--n", "0"]) == 0
    assert "pooled n/a" in capsys.readouterr().out


def test_denoiser_relation_probe_script(tmp_path, capsys, monkeypatch):
    import importlib.util

    from mmsynth.models.zoo import tiny_bundle

    captions_module = importlib.import_module("mmsynth.data.captions")  # the package exports a function of that name
    probe = _probe("denoiser_relation_probe")
    tiny_bundle(seed=0).save_pretrained(tmp_path / "m")
    gaps = probe.relation_loss_gap(str(tmp_path / "m"), n=4, bands=((0, 500), (500, 1000)))
    assert list(gaps) == [(0, 500), (500, 1000)]
    assert all(gap != 0 and 0 <= wins <= 1 for gap, wins in gaps.values())  # a random tower keeps the word
    assert probe.main(["--model", str(tmp_path / "m"), "--n", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(probe.BANDS) + 2  # and two header lines
    real = captions_module.flip_relations
    monkeypatch.setattr(captions_module, "flip_relations", lambda c: c if real(c) else None)  # a "flip": no change
    same = probe.relation_loss_gap(str(tmp_path / "m"), n=4, bands=((0, 1000),))
    assert same[(0, 1000)] == (0.0, 0.0)  # the same caption twice: no gap, never better
    assert probe.swap_colours("a red circle left of two blue squares") == "a blue circle left of two red squares"
    assert probe.swap_colours("two red circles") is None and probe.swap_colours("a red circle and a red star") is None


def test_terminal_snr_probe_script(tmp_path, capsys):

    import pytest
    import torch

    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.sample.controls import Step

    probe = _probe("terminal_snr_probe")
    torch.manual_seed(0)
    x0, eps, a = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), 0.3
    x = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0  # diffusers' get_velocity
    step = Step(0, 1, torch.tensor(500), a, a)  # the probe's x0 guess is the sampler's
    torch.testing.assert_close(step.to_x0(x, eps, "epsilon"), x0)
    torch.testing.assert_close(step.to_x0(x, v, "v_prediction"), x0)
    zero = Step(0, 1, torch.tensor(999), 0.0, 0.0)  # zero terminal SNR: x_T is pure noise and v = -x0
    torch.testing.assert_close(zero.to_x0(eps, -x0, "v_prediction"), x0)
    assert probe.layout_correlation(x0 + 5.0, x0) == pytest.approx(1.0)  # a brightness offset is not layout
    assert probe.layout_correlation(-x0, x0) == pytest.approx(-1.0)
    assert abs(probe.layout_correlation(eps, x0)) < 0.3
    tiny_bundle(seed=0).save_pretrained(tmp_path / "m")
    rows = probe.probe(str(tmp_path / "m"), n=3, timesteps=(999, 500))
    assert [(r["t"], r["start"], r["caption"]) for r in rows[:4]] == [
        (999, s, c) for s in ("training noise", "pure noise") for c in ("scene", "empty")]  # fmt: skip
    assert len(rows) == 8 and all(r["mse"] > 0 and -1 <= r["corr"] <= 1 for r in rows)
    assert probe.main(["--model", str(tmp_path / "m"), "--n", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + 4 * len(probe.TIMESTEPS)


def test_a_clip_soup_averages_the_vision_towers_and_keeps_the_text_tower(tmp_path):
    import json

    import torch

    from mmsynth.errors import InputError
    from mmsynth.models.bundle import load_component, save_components
    from mmsynth.models.zoo import tiny_bundle

    soup = _probe("soup_clip")
    bundle = tiny_bundle(seed=4)
    runs = []
    for k, shift in enumerate([1.0, 3.0]):  # two vision-side stages from one start
        clip = tiny_bundle(seed=4).clip
        with torch.no_grad():
            clip.vision_model.post_layernorm.bias.add_(shift)
        runs.append(str(save_components(tmp_path / f"run{k}", clip=clip, text_encoder=bundle.text_encoder,
                                        tokenizer=bundle.tokenizer)))  # fmt: skip
    out = tmp_path / "soup"
    assert soup.main(["--runs", *runs, "--out", str(out)]) == 0
    mixed = load_component(out, "clip")
    start = bundle.clip.vision_model.post_layernorm.bias
    assert torch.allclose(mixed.vision_model.post_layernorm.bias, start + 2.0, atol=1e-3)  # fp32 mean of 1 and 3
    assert torch.equal(mixed.text_model.final_layer_norm.bias, bundle.clip.text_model.final_layer_norm.bias)
    assert json.loads((out / "soup.json").read_text()) == {"method": "uniform", "kept": runs}
    assert load_component(out, "tokenizer") is not None and load_component(out, "text_encoder") is not None
    # greedy: the first ingredient is the better one alone; the second is kept only if the mean scores higher
    assert soup.main(["--runs", *runs, "--out", str(tmp_path / "greedy"), "--greedy", "--n", "4"]) == 0
    record = json.loads((tmp_path / "greedy" / "soup.json").read_text())
    assert set(record["alone"]) == set(runs) and record["split"] == "val" and len(record["steps"]) == 1
    assert record["steps"][0]["kept"] == (record["steps"][0]["score"] > max(record["alone"].values()))
    assert len(record["kept"]) == 1 + record["steps"][0]["kept"]
    # a stage that moved the text tower (the UNet's text encoder) is refused
    moved = tiny_bundle(seed=4).clip
    with torch.no_grad():
        moved.text_model.final_layer_norm.bias.add_(1.0)
    save_components(tmp_path / "moved", clip=moved)
    with pytest.raises(InputError, match="text tower differs"):
        soup.main(["--runs", runs[0], str(tmp_path / "moved"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_mine_clip_negatives_writes_a_table_the_clip_recipe_reads_and_refuses_bad_numbers(tmp_path):
    from mmsynth.errors import InputError
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train.mining import load_table

    mine = _probe("mine_clip_negatives")
    model = tmp_path / "tiny"
    tiny_bundle(seed=2).save_pretrained(model)
    out = tmp_path / "t.npz"
    assert mine.main(["--model", str(model), "--seed", "3", "--sources", "16", "--batch-size", "8", "--out",
                      str(out)]) == 0  # fmt: skip
    table = load_table(out)
    assert table["neighbours"].shape == (16, 2) and (table["seed"], table["block"]) == (3, 2)
    with pytest.raises(InputError, match=r"--batch-size must be a multiple of --group \+ --per-source \(4\), got 10"):
        mine.main(["--model", str(model), "--seed", "3", "--batch-size", "10", "--out", str(tmp_path / "b.npz")])
    with pytest.raises(InputError, match="--sources must be >= 1, got 0"):
        mine.main(["--model", str(model), "--seed", "3", "--sources", "0", "--out", str(tmp_path / "b.npz")])
    assert not (tmp_path / "b.npz").exists()
