"""The `control` bench suite: cases with exact maps, condition metrics on known images, bars, sweeps, end to end."""

import dataclasses

import numpy as np
import pytest

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.evaluate.bench import (
    RunContext,
    RunOptions,
    get_suite,
    make_cases,
    parse_sweep,
    parse_variant,
    plan,
    read_cases,
    write_cases,
)
from mmsynth.evaluate.bench.control_suite import (
    CATEGORIES,
    COMPONENTS,
    bar_notes,
    control_dict,
    controls_for,
    judge_segmentation,
    silhouettes,
)
from mmsynth.evaluate.bench.results import RowResult
from mmsynth.evaluate.control_metrics import occlusion_contours, occlusion_order
from mmsynth.evaluate.scoring import Metric


@pytest.fixture(scope="module")
def cases():
    return make_cases("control", 3, seed=0)


def test_cases_are_deterministic_test_scenes_with_exact_maps(tmp_path, cases):
    from mmsynth.annotate import from_scene

    assert [c.id for c in cases] == [c.id for c in make_cases("control", 3, seed=0)]
    assert [c.to_dict() for c in cases] == [c.to_dict() for c in make_cases("control", 3, seed=0)]
    assert {c.category for c in cases} == set(CATEGORIES) and len(cases) == 3 * len(CATEGORIES)
    assert len({c.seed for c in cases}) == len(cases) and all(c.scene.split == "test" for c in cases)
    write_cases(cases, tmp_path / "c.jsonl")
    back = read_cases(tmp_path / "c.jsonl")
    assert [c.to_dict() for c in back] == [c.to_dict() for c in cases]
    for c in back:
        maps = c.condition_maps()
        if c.category == "segmentation":
            assert np.array_equal(maps["segmentation"], from_scene("semantic", c.scene, c.resolution))
        if c.category == "depth":
            assert np.array_equal(maps["depth"], from_scene("depth", c.scene, c.resolution))
            masks = silhouettes(c.scene, c.resolution)  # some pair overlaps: its order is visible
            assert any((a & b).sum() >= 4 for i, a in enumerate(masks) for b in masks[i + 1:])
        if c.category == "multi":
            assert [s.kind for s in c.controls] == ["canny", "palette"]
        if c.category == "conflict":  # the condition is another scene's edges, embedded in the case
            assert c.controls[0].map.startswith("data:image/png")
            other = c.scene.from_dict(c.extra["condition_scene"])
            assert np.array_equal(maps["canny"], from_scene("canny", other, c.resolution, low=100, high=200))
            assert not np.array_equal(maps["canny"], from_scene("canny", c.scene, c.resolution, low=100, high=200))


def test_a_categorys_first_cases_are_the_same_for_every_n(cases):
    """Case j of a category (scene, prompt, seed, condition) does not depend on n: a curve at n = 16 is the first
    16 cases of a bench run at n = 300."""
    fewer = make_cases("control", 2, seed=0)
    for category in CATEGORIES:
        mine = [c for c in cases if c.category == category][:2]
        theirs = [c for c in fewer if c.category == category]
        assert [c.to_dict() for c in mine] == [c.to_dict() for c in theirs]
        assert [c.seed for c in mine] == [c.seed for c in theirs]


def test_renders_score_near_perfect_and_blank_images_low(cases):
    score = get_suite("control").score
    perfect = score(None, cases, [c.render() for c in cases], []).metrics
    blank = score(None, cases, [np.full_like(c.render(), 128) for c in cases], []).metrics
    for name in ("canny_f1", "canny_f1_low", "sketch_ssim", "depth_order", "multi_canny_f1"):
        assert perfect[name].value == 1.0, name
    assert perfect["segmentation_miou"].value > 0.9
    assert perfect["palette_error"].value < 1.0 and blank["palette_error"].value > 20
    assert all(perfect[f"{c}_attribute_acc"].value == 1.0 for c in CATEGORIES)
    assert perfect["conflict_canny_f1"].value < 0.3  # the render follows its own scene, not the other one
    for name in ("canny_f1", "depth_order", "depth_order_contour", "multi_canny_f1", "conflict_canny_f1"):
        assert blank[name].value == 0.0, name
    assert blank["segmentation_miou"].value < 0.5 and blank["sketch_ssim"].value < perfect["sketch_ssim"].value
    assert perfect["depth_order"].low < 1.0 and perfect["canny_f1"].n == 3  # intervals and counts are kept


def test_occlusion_order_and_judge_segmentation_on_known_images(cases):
    a, b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    a[:, :5], b[:, 3:] = True, True
    front_b = [a & ~b, b]  # b (listed second: nearer) owns the overlap
    assert occlusion_order(front_b, [a, b]) == (1, 1)
    assert occlusion_order([a, b & ~a], [a, b]) == (0, 1)
    assert occlusion_order([a, b], [a, np.zeros_like(b)]) == (0, 0)  # no overlap: no visible order
    with pytest.raises(InputError, match="visible masks"):
        occlusion_order([a], [a, b])
    case = next(c for c in cases if c.category == "segmentation")
    seg = judge_segmentation(case.render())
    assert seg.shape == (case.resolution,) * 2 and set(np.unique(seg)) <= set(range(6))


def test_occlusion_contours_read_depth_from_outlines_alone():
    a, b = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    a[2:12, 2:12], b[6:14, 6:14] = True, True  # b (listed second) is nearer
    outline = lambda m: m & ~np.pad(m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:],  # noqa: E731
                                    1)  # fmt: skip
    b_on_top = outline(b) | (outline(a) & ~b)  # what a flat image of b over a shows as edges
    a_on_top = outline(a) | (outline(b) & ~a)
    assert occlusion_contours(b_on_top.astype(np.uint8) * 255, [a, b]) == (1, 1)
    assert occlusion_contours(a_on_top, [a, b]) == (0, 1)
    assert occlusion_contours(b_on_top, [a, b], looks=["red", "red"]) == (0, 0)  # alike: no edge between them
    small = np.zeros_like(b)
    small[4:8, 4:8] = True  # wholly inside a: its own outline alone decides
    assert occlusion_contours(outline(a) | outline(small), [a, small]) == (1, 1)
    assert occlusion_contours(outline(a), [a, small]) == (0, 1)
    assert occlusion_contours(outline(a), [small, a]) == (0, 0)  # the farther one wholly hidden: skipped
    assert occlusion_contours(np.zeros((16, 16), bool), [a, np.zeros_like(b)]) == (0, 0)  # no overlap
    with pytest.raises(InputError, match="differ in shape"):
        occlusion_contours(np.zeros((8, 8), bool), [a, b])


def test_rows_capabilities_and_skips_on_a_model_without_controls(bundle, cases):
    suite = get_suite("control")
    assert {"ground_truth", "vae_ceiling", "no_control", "multi", *COMPONENTS.values(), "conflict_balanced",
            "conflict_prompt", "conflict_control", "composer"} == set(suite.rows)  # fmt: skip
    planned, pending = plan(cases, RunContext(bundle_obj=bundle), RunOptions())
    by_row = {p.row.name: p for p in planned}
    assert "control" not in pending and len(by_row["no_control"].todo) == len(cases)
    assert not by_row["controlnet_canny"].todo and len(by_row["controlnet_canny"].skipped) == 6  # canny + multi
    assert by_row["controlnet_canny"].skipped[0]["reason"] == "the model lacks control:canny"
    assert by_row["adapter_sketch"].skipped[0]["reason"] == "the model lacks control:xdog"
    assert len(by_row["conflict_prompt"].skipped) == 3  # its own category only
    assert by_row["multi"].skipped[0]["reason"] == "the model lacks control:canny, control:palette"


def test_control_dicts_follow_the_row_settings():
    d = control_dict("controlnet_canny", "IMG", {"scale": 0.5, "start": 0.1, "end": 0.8, "mode": 2})
    assert d == {"name": "controlnet", "model": "controlnet_canny", "image": "IMG", "mode": "control",
                 "schedule": {"scale": 0.5, "start": 0.1, "end": 0.8}}  # fmt: skip
    assert control_dict("adapter_depth", "IMG", {})["name"] == "t2i-adapter"
    assert "mode" not in control_dict("adapter_depth", "IMG", {})


def test_segmentation_cases_reach_the_network_colour_coded_as_in_training(cases):
    """The bench gives a ControlNet the segmentation map as the recipe trained it (colour-coded labels), not the
    raw label ids (nearly black); edges pass unchanged."""
    from mmsynth.train.conditions import prepared
    from mmsynth.viz import colorize_labels

    seg = next(c for c in cases if c.category == "segmentation")
    labels = seg.condition_maps()["segmentation"]
    control = controls_for(None)(RunContext(bundle_obj=None), [seg])[0]
    assert control.image.shape == (*labels.shape, 3)
    assert np.array_equal(control.image, colorize_labels(labels))
    trained = (prepared("segmentation", labels) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(trained, control.image)
    canny = next(c for c in cases if c.category == "canny")
    assert np.array_equal(controls_for(None)(RunContext(bundle_obj=None), [canny])[0].image,
                          canny.condition_maps()["canny"])


def test_sweeps_of_scale_start_end_and_mode(bundle, cases):
    assert parse_sweep("scale=0,0.25,0.5,1,1.5") == ("scale", [0.0, 0.25, 0.5, 1.0, 1.5])
    assert parse_variant("controlnet_canny:start=0.2,end=0.6") == ("controlnet_canny", {"start": 0.2, "end": 0.6})
    for bad in ("mode=3", "start=1", "end=0", "scale=-1"):
        with pytest.raises(InputError, match="must be"):
            parse_sweep(bad)
    planned, _ = plan(cases, RunContext(bundle_obj=bundle), RunOptions(rows=["controlnet_canny", "adapter_depth"],
                                                                       sweeps={"scale": [0.5], "mode": [1]}))
    names = {p.row.name for p in planned}
    assert {"controlnet_canny[scale=0.5]", "controlnet_canny[mode=1]", "adapter_depth[scale=0.5]"} <= names
    assert "adapter_depth[mode=1]" not in names  # adapters have no control mode
    with pytest.raises(InputError, match="cannot vary mode"):
        plan(cases, RunContext(bundle_obj=bundle), RunOptions(variants=[("adapter_palette", {"mode": 1.0})]))


def _row(row: str, **metrics: float) -> RowResult:
    return RowResult("control", row, "method", "", {k: Metric(v, 10) for k, v in metrics.items()})


def test_bars_are_marked_met_or_not_from_the_rows():
    rows = [_row("no_control", canny_f1=0.2, palette_error=20.0, canny_attribute_acc=0.8, conflict_canny_f1=0.1,
                 conflict_attribute_acc=0.8),
            _row("controlnet_canny", canny_f1=0.65, canny_attribute_acc=0.7, multi_canny_f1=0.6),
            _row("adapter_palette", palette_error=11.0, multi_palette_error=10.0),
            _row("multi", multi_canny_f1=0.58, multi_palette_error=10.5),
            _row("conflict_control", conflict_canny_f1=0.6, conflict_attribute_acc=0.3),
            _row("conflict_prompt", conflict_canny_f1=0.15, conflict_attribute_acc=0.8)]  # fmt: skip
    notes = "\n".join(bar_notes(rows))
    assert "canny F1 >= 0.6 and >= +0.3 over no_control: met (0.650 vs 0.200)" in notes
    assert "palette error at most half of no_control's: NOT met (11.000 vs 20.000)" in notes
    assert "controlnet_canny attribute accuracy within 5 points of no_control: NOT met" in notes
    assert "segmentation mIoU >= 0.7: not measured" in notes
    assert "multi canny F1 within 10% of the canny ControlNet alone: met" in notes
    assert "multi palette error within 10% of the palette adapter alone: met" in notes
    assert "conflict, mode control: the condition wins" in notes and "conflict, mode prompt: the prompt wins" in notes
    assert "conflict, mode balanced: not measured" in notes


def test_suite_is_listed_and_makes_cases_from_the_cli(tmp_path, capsys):
    assert main(["bench", "suites"]) == 0
    out = capsys.readouterr().out
    assert "control: spatial controls" in out and "controlnet_canny" in out and "conflict_prompt" in out
    assert main(["bench", "make-cases", "--suite", "control", "--n", "1", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert len(read_cases(tmp_path / "c.jsonl")) == len(CATEGORIES)


@pytest.fixture(scope="module")
def control_model(tmp_path_factory):
    """A random tiny bundle (cross-attention in every down block, as build_adapter needs) carrying every control
    component the suite knows, saved and reloaded."""
    from mmsynth.models.zoo import TINY, build_adapter, build_controlnet, random_bundle

    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), 0)
    for component in COMPONENTS.values():
        build = build_controlnet if component.startswith("controlnet_") else build_adapter
        b.extras[component] = build(b.unet, b.vae_scale_factor)
    return str(b.save_pretrained(tmp_path_factory.mktemp("model") / "controls"))


def test_end_to_end_every_row_runs_and_writes_the_report(tmp_path, control_model, model_dir, capsys):
    import json

    out = tmp_path / "r" / "out.json"
    args = ["bench", "run", "--suite", "control", "--n", "1", "--steps", "2", "--json"]
    assert main([*args, str(out), "--model", control_model, "--sweep", "scale=0,1.5"]) == 0
    d = json.loads(out.read_text())
    rows = d["results"]["control"]
    assert {"no_control", "multi", "conflict_balanced", *COMPONENTS.values(), "controlnet_canny[scale=0]"} <= set(rows)
    assert set(d["skipped"]["control"]) == {"composer"}  # every control row ran; the model carries no Composer
    assert rows["multi"]["multi_canny_f1"] is not None
    assert any("canny F1 >= 0.6" in n for n in d["notes"]["control"])
    html = (tmp_path / "r" / "out_report" / "index.html").read_text()
    assert "control_canny_f1_vs_scale.png" in html and "depth order &gt;= 0.9" in html
    bare = tmp_path / "bare.json"
    assert main([*args, str(bare), "--model", model_dir, "--no-html", "--rows", "no_control,adapter_depth"]) == 0
    d = json.loads(bare.read_text())
    assert d["rows"]["control"]["adapter_depth"]["n_cases"] == 0
    assert d["skipped"]["control"]["adapter_depth"][0]["reason"] == "the model lacks control:depth"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mmsynth.models.zoo import tiny_bundle

    return str(tiny_bundle(0).save_pretrained(tmp_path_factory.mktemp("bare") / "tiny"))
