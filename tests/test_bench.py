"""`mmsynth bench`: case format, suites, metrics on constructed examples, determinism, shard merging, CLI errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from mmsynth.cli.main import main
from mmsynth.data import render
from mmsynth.data.scene import Scene
from mmsynth.data.vocab import COLOR_NAMES, COLORS
from mmsynth.errors import InputError
from mmsynth.evaluate.bench import (
    Case,
    ControlSpec,
    RunContext,
    RunOptions,
    SamplerSettings,
    generate_shard,
    get_suite,
    make_cases,
    merge_shards,
    plan,
    read_cases,
    run_bench,
    shard,
    write_cases,
)
from mmsynth.evaluate.bench.extractors import shapesclip_features
from mmsynth.evaluate.bench.fidelity_suite import fidelity_metrics, to_tensor
from mmsynth.evaluate.bench.t2i import CATEGORIES
from mmsynth.io import save_image
from mmsynth.models.zoo import tiny_bundle

STEPS = 2


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle(0)


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return str(bundle.save_pretrained(tmp_path_factory.mktemp("model") / "tiny"))


def _ctx(bundle):
    return RunContext(bundle_obj=bundle, sampler=SamplerSettings(steps=STEPS))


@pytest.fixture(scope="module")
def cases():
    return make_cases("t2i", 1, seed=0) + make_cases("fidelity", 4, seed=0)


@pytest.fixture(scope="module")
def result(bundle, cases):
    return run_bench(cases, _ctx(bundle), RunOptions(rows=["base_uncond", "t2i"]))


# ---------------------------------------------------------------- cases


def test_case_file_round_trip_keeps_every_field(tmp_path, cases):
    extra = Case(id="x/1", suite="t2i", scene=cases[0].scene, category="custom", prompt="a red circle",
                 negative_prompt="a blue square", controls=[ControlSpec("edges"), ControlSpec("canny", {"low": 50})],
                 layout=True, mask={"object": 0}, seed=7, resolution=32, group="g", extra={"note": 1})  # fmt: skip
    write_cases([*cases, extra], tmp_path / "c.jsonl")
    back = read_cases(tmp_path / "c.jsonl")
    assert back == [*cases, extra]
    assert back[-1].requirements() == ["text", "control:edges", "control:canny", "layout", "inpaint"]
    maps = back[-1].condition_maps()
    assert maps["edges"].shape == (32, 32) and maps["edges"].any()
    assert {c.category for c in cases if c.suite == "t2i"} == set(CATEGORIES)
    assert sum(c.reference for c in cases) == 4  # fidelity's real set


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("scene"), "line 2: field 'scene': missing"),
        (lambda d: d.update(suite="nope"), "line 2: field 'suite': 'nope' is not one of"),
        (lambda d: d["scene"]["objects"][0].update(color="mauve"), r"line 2: field 'scene'.objects\[0\].color"),
        (lambda d: d.update(seed=True), "line 2: field 'seed': expected a non-negative integer"),
        (lambda d: d.update(controls=[{"kind": "sonar"}]), r"line 2: field 'controls\[0\].kind'"),
        (lambda d: d.update(mask={"object": 9}), "line 2: field 'mask.object'"),
        (lambda d: d.update(id="t2i/single_object/0000"), "line 2: field 'id': .* already used on line 1"),
        (lambda d: d.update(colour="red"), r"line 2: unknown field\(s\) \['colour'\]"),
    ],
)
def test_malformed_case_lines_name_the_line_and_field(tmp_path, cases, change, message):
    first, second = cases[0].to_dict(), cases[1].to_dict()
    change(second)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(InputError, match=message):
        read_cases(path)
    path.write_text(json.dumps(first) + "\n{not json\n")
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_cases(path)


def test_case_needing_a_missing_control_is_skipped_or_fails_with_strict(bundle, cases):
    needy = Case(id="needs/edges", suite="t2i", scene=cases[0].scene, prompt=cases[0].prompt,
                 controls=[ControlSpec("edges")])  # fmt: skip
    planned, _ = plan([cases[0], needy], _ctx(bundle), RunOptions(rows=["ground_truth", "t2i"]))
    by_row = {p.row.name: p for p in planned}
    assert [c.id for c in by_row["ground_truth"].todo] == [cases[0].id, "needs/edges"]
    assert by_row["t2i"].skipped == [{"case": "needs/edges", "reason": "the model lacks control:edges"}]
    with pytest.raises(InputError, match=r"--strict: case 'needs/edges'.*control:edges"):
        plan([needy], _ctx(bundle), RunOptions(rows=["t2i"], strict=True))


# ---------------------------------------------------------------- metrics on known answers


def _recolour(scene: Scene) -> Scene:
    """Every object in a colour that is not its own (and not another object's): all colours wrong."""
    d = scene.to_dict()
    used = {o["color"] for o in d["objects"]}
    free = [c for c in COLOR_NAMES if c not in used]
    for o in d["objects"]:
        o["color"] = free[0]
        o["rgb"] = list(COLORS[free[0]])
    return Scene.from_dict(d)


def test_ground_truth_scores_one_and_wrong_colours_score_zero(bundle):
    cases = make_cases("t2i", 2, seed=3)
    suite = get_suite("t2i")
    gt = suite.score(_ctx(bundle), cases, [c.render() for c in cases], [])
    for name in (*CATEGORIES, "overall", "object_f1", "attribute_acc"):
        assert gt.metrics[name].value == 1.0, name
    assert gt.metrics["overall"].n == len(cases) and 0.7 < gt.metrics["overall"].low < 1.0
    wrong = suite.score(_ctx(bundle), cases, [render(_recolour(c.scene), c.resolution) for c in cases], [])
    for name in (*CATEGORIES, "overall", "attribute_acc"):
        assert wrong.metrics[name].value == 0.0, name


def test_fidelity_of_a_set_with_itself_is_near_zero_and_larger_for_another_distribution(bundle):
    feats = shapesclip_features(bundle)
    real = to_tensor([c.render() for c in make_cases("fidelity", 8, seed=0) if c.reference], feats.size)
    rng = np.random.default_rng(0)
    noise = to_tensor(list(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)), feats.size)
    same, _ = fidelity_metrics(real, real.clone(), feats, ["a"] * 8)
    other, _ = fidelity_metrics(real, noise, feats, ["a"] * 8)
    assert abs(same["fd_shapesclip"].value) < 1e-3 and other["fd_shapesclip"].value > 1.0
    assert other["kid_shapesclip"].value > same["kid_shapesclip"].value
    assert same["precision"].value == same["recall"].value == 1.0
    few, missing = fidelity_metrics(real[:3], real[:3], feats)
    assert "fd_shapesclip" in few and "needs at least 4 images" in missing["precision"]


# ---------------------------------------------------------------- runs: schema, determinism, merging


def test_result_schema(result):
    d = result.to_dict()
    assert set(d) == {"format", "results", "intervals", "counts", "rows", "unavailable", "skipped", "pending",
                      "notes", "environment", "wall_s"}  # fmt: skip
    assert set(d["results"]) == {"t2i", "fidelity"}
    assert set(d["results"]["t2i"]) == {"base_uncond", "t2i"}
    for suite in d["results"].values():
        for metrics in suite.values():
            assert metrics and all(v is None or isinstance(v, float) for v in metrics.values())
    assert d["rows"]["t2i"]["t2i"]["n_cases"] == 6 and d["rows"]["t2i"]["t2i"]["wall_s"] > 0
    assert d["rows"]["t2i"]["t2i"]["settings"]["steps"] == STEPS
    assert d["intervals"]["t2i"]["t2i"]["overall"][0] <= d["results"]["t2i"]["t2i"]["overall"]
    assert set(d["results"]["fidelity"]["t2i"]) >= {"fd_shapesclip", "kid_shapesclip", "precision", "recall",
                                                    "diversity"}  # fmt: skip
    assert "lpips" in d["unavailable"]["fidelity"]["t2i"]
    env = d["environment"]
    assert env["versions"]["torch"] and env["sample_counts"]["fidelity"] == {"cases": 8, "reference": 4}
    assert json.loads(json.dumps(d)) == d
    assert "| t2i | method | 6 |" in result.markdown()


def test_same_cases_and_seed_give_the_same_numbers(bundle, cases, result):
    def untimed(res):  # cost_ratio is a ratio of seconds: the one figure that differs between runs
        return {s: {r: {k: v for k, v in m.items() if k != "cost_ratio"} for r, m in rows.items()}
                for s, rows in res.to_dict()["results"].items()}  # fmt: skip

    again = run_bench(cases, _ctx(bundle), RunOptions(rows=["base_uncond", "t2i"]))
    assert untimed(again) == untimed(result) and result.to_dict()["results"]["t2i"]["t2i"]["cost_ratio"] == 1.0


def test_batches_give_the_images_of_cases_generated_alone(bundle, cases):
    row = get_suite("t2i").rows["t2i"]
    todo = [c for c in cases if c.suite == "t2i"]
    alone = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=1), row, todo)]
    batch = [img for _, img in generate_shard(dataclasses.replace(_ctx(bundle), batch_size=4), row, todo)]
    for a, b in zip(alone, batch):  # same noise and prompt per image; batched kernels may round differently
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert len({a.tobytes() for a in batch}) == len(batch)


@pytest.mark.parametrize("batch_size,first", [(1, [0, 1, 2]), (2, [0, 1, 2, 3])])
def test_two_shards_merge_to_the_single_process_images(bundle, cases, batch_size, first):
    ctx, row = dataclasses.replace(_ctx(bundle), batch_size=batch_size), get_suite("t2i").rows["t2i"]
    todo = [c for c in cases if c.suite == "t2i"][:5]  # an odd count: uneven shards
    whole = merge_shards([generate_shard(ctx, row, todo)], len(todo))
    parts = [generate_shard(ctx, row, todo, rank, 2) for rank in (0, 1)]
    assert [i for i, _ in parts[0]] == first and sorted(i for i, _ in parts[1]) == sorted({0, 1, 2, 3, 4} - set(first))
    merged = merge_shards(parts[::-1], len(todo))  # gather order does not matter
    assert all(np.array_equal(a, b) for a, b in zip(merged, whole))
    assert len({a.tobytes() for a in whole}) == len(whole)  # distinct seeds, distinct images
    with pytest.raises(RuntimeError, match="missing"):
        merge_shards(parts[:1], len(todo))
    with pytest.raises(RuntimeError, match="twice"):
        merge_shards([parts[0], parts[0]], len(todo))
    assert sorted(i for r in range(3) for i, _ in shard(list(range(7)), r, 3)) == list(range(7))


def test_sweep_rows_and_pending_suites(bundle, monkeypatch):
    from mmsynth.evaluate.bench.registry import SUITES, Suite

    monkeypatch.setitem(SUITES, "future", Suite(name="future", description="a suite without methods yet",
                                                pending="no rows yet: nothing is shipped"))
    cases = make_cases("t2i", 1, seed=1)[:2]
    res = run_bench(cases, _ctx(bundle), RunOptions(rows=["t2i"], sweeps={"cfg": [1.0]}, include_pending=True))
    d = res.to_dict()
    assert set(d["results"]["t2i"]) == {"t2i", "t2i[cfg=1]"}
    assert d["rows"]["t2i"]["t2i[cfg=1]"]["sweep"] == {"row": "t2i", "param": "cfg", "value": 1.0}
    assert d["rows"]["t2i"]["t2i[cfg=1]"]["settings"]["cfg"] == 1.0
    assert set(d["pending"]) == {"future"} and d["results"]["future"] == {}
    assert "no rows yet" in d["pending"]["future"] and "no rows yet" in res.markdown()


def test_a_best_of_sweep_shares_candidates_and_gives_no_cost_ratio_for_rows_that_reused_them(bundle):
    cases = make_cases("t2i", 1, seed=1)[:2]
    res = run_bench(cases, _ctx(bundle), RunOptions(rows=["t2i"], sweeps={"best_of": [2.0, 3.0]}))
    rows = {r.row: r for r in res.rows}
    assert "cost_ratio" in rows["t2i[best_of=2]"].metrics  # drew all its candidates
    assert "cost_ratio" not in rows["t2i[best_of=3]"].metrics
    assert "were reused from an earlier row" in rows["t2i[best_of=3]"].unavailable["cost_ratio"]
    alone = run_bench(cases, _ctx(bundle), RunOptions(rows=["t2i"], sweeps={"best_of": [3.0]}))
    mine = next(r for r in alone.rows if r.row == "t2i[best_of=3]")
    assert mine.cases == rows["t2i[best_of=3]"].cases and "cost_ratio" in mine.metrics  # same picks, alone


# ---------------------------------------------------------------- CLI


def test_cli_run_writes_json_markdown_and_html(tmp_path, model_dir, capsys):
    main(["bench", "make-cases", "--suite", "t2i", "--n", "1", "--seed", "2", "--out", str(tmp_path / "c.jsonl")])
    out = tmp_path / "rep" / "res.json"
    code = main(["bench", "run", "--cases", str(tmp_path / "c.jsonl"), "--model", model_dir, "--steps", "2",
                 "--rows", "ground_truth,t2i", "--sweep", "cfg=1,3", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    d = json.loads(out.read_text())
    assert d["results"]["t2i"]["ground_truth"]["overall"] == 1.0
    assert "| ground_truth | reference | 6 |" in capsys.readouterr().out
    assert (tmp_path / "rep" / "res.md").read_text().startswith("### t2i")
    html = (tmp_path / "rep" / "res_report" / "index.html").read_text()
    assert "images/t2i_t2i.png" in html and "plots/t2i_overall_vs_cfg.png" in html
    assert (tmp_path / "rep" / "res_report" / "plots" / "t2i_overall_vs_cfg.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["res.cases.jsonl", "res.json", "res.md",
                                                                   "res_report"]  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "rep" / "res.cases.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 6  # rows ground_truth, t2i, t2i[cfg=1], t2i[cfg=3] x one case per category
    for row, rows in d["results"]["t2i"].items():
        mine = [r for r in records if r["row"] == row]
        scored = [r["ok"] for r in mine if r["ok"] is not None]
        assert rows["overall"] == pytest.approx(sum(scored) / len(scored), abs=1e-4)  # the per-case verdicts add up
        assert all(r["verdict"]["n_expected"] >= 1 and r["prompt"] for r in mine)


def test_cli_fidelity_on_folders(tmp_path, model_dir, capsys):
    real, fake, empty = tmp_path / "real", tmp_path / "fake", tmp_path / "empty"
    empty.mkdir()
    for i, c in enumerate(c for c in make_cases("fidelity", 4, seed=0)):
        save_image(c.render(), (real if c.reference else fake) / f"{i}.png")
    save_image(np.zeros((48, 48, 3), np.uint8), fake / "odd_size.png")  # resized like the rest
    assert main(["bench", "fidelity", "--real", str(real), "--fake", str(fake), "--model", model_dir,
                 "--json", str(tmp_path / "f.json")]) == 0  # fmt: skip
    d = json.loads((tmp_path / "f.json").read_text())
    assert d["results"]["fidelity"]["folders"]["fd_shapesclip"] > 0
    assert main(["bench", "fidelity", "--real", str(empty), "--fake", str(fake), "--model", model_dir]) == 2
    assert "has 0 PNG image(s); fidelity needs at least 4" in capsys.readouterr().err
    (fake / "x.jpg").write_bytes(b"")
    assert main(["bench", "fidelity", "--real", str(real), "--fake", str(fake), "--model", model_dir]) == 2
    assert "PNG only" in capsys.readouterr().err


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, cases, capsys, monkeypatch):
    from mmsynth.evaluate.bench.registry import SUITES, Suite

    monkeypatch.setitem(SUITES, "future", Suite(name="future", description="a suite without methods yet",
                                                pending="no rows yet: nothing is shipped"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(cases[0].to_dict()) + "\n" + json.dumps({"id": "x", "suite": "t2i"}) + "\n")
    out = tmp_path / "o" / "res.json"
    assert main(["bench", "run", "--cases", str(bad), "--json", str(out)]) == 2
    assert "line 2: field 'scene': missing" in capsys.readouterr().err
    assert not out.parent.exists()
    assert main(["bench", "make-cases", "--suite", "future", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "no rows yet" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
    assert main(["bench", "run", "--quick", "--sweep", "cfg=a", "--json", str(out)]) == 2
    assert main(["bench", "run", "--quick", "--extractor", "inception", "--json", str(out)]) == 2
    assert "needs --weights" in capsys.readouterr().err
    assert main(["bench", "run", "--cases", str(bad), "--suite", "t2i"]) == 2
    assert not out.parent.exists()


def test_kid_is_deterministic_given_the_seed(bundle):
    feats = shapesclip_features(bundle)
    imgs = to_tensor([c.render() for c in make_cases("fidelity", 6, seed=1)], feats.size)
    a, _ = fidelity_metrics(imgs[:6], imgs[6:], feats, seed=5)
    torch.manual_seed(123)  # the global RNG does not leak into the metric
    b, _ = fidelity_metrics(imgs[:6], imgs[6:], feats, seed=5)
    assert a["kid_shapesclip"].value == b["kid_shapesclip"].value


@pytest.mark.skipif(not __import__("os").environ.get("MMSYNTH_SLOW_TESTS"), reason="~15 s: set MMSYNTH_SLOW_TESTS=1")
def test_two_cpu_processes_through_accelerate_match_one(tmp_path, model_dir):
    import os
    import subprocess
    import sys

    main(["bench", "make-cases", "--suite", "t2i", "--n", "1", "--seed", "4", "--out", str(tmp_path / "c.jsonl")])
    args = ["bench", "run", "--cases", str(tmp_path / "c.jsonl"), "--model", model_dir, "--steps", "2", "--rows",
            "t2i", "--quiet", "--no-html", "--json"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "mmsynth.cli.main"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*launch, *args, str(tmp_path / "mp.json")], check=True, env=env, capture_output=True)
    assert main([*args, str(tmp_path / "sp.json")]) == 0
    mp, sp = (json.loads((tmp_path / f).read_text()) for f in ("mp.json", "sp.json"))
    assert mp["environment"]["world_size"] == 2 and sp["environment"]["world_size"] == 1
    assert mp["results"] == sp["results"]


def test_vae_ceiling_row_round_trips_the_render_through_the_vae(bundle):
    case = make_cases("t2i", 1, seed=0)[0]
    img = get_suite("t2i").rows["vae_ceiling"].generate(_ctx(bundle), case)
    assert img.shape == case.render().shape and img.dtype == np.uint8
    assert not np.array_equal(img, case.render())  # a random tiny VAE is far from lossless
