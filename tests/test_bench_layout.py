"""The `layout` bench suite: metrics on constructed detections, hidden-seed cases, the row helper, end to end."""

import contextlib
import dataclasses
import importlib.util
import io
import json

import numpy as np
import pytest

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.evaluate.bench import (
    RunContext,
    RunOptions,
    SamplerSettings,
    get_suite,
    make_cases,
    plan,
    read_cases,
    run_bench,
    write_cases,
)
from mmsynth.evaluate.bench.layout_suite import (
    bar_notes,
    case_layout,
    check,
    forward_controls,
    judge,
    layout_metrics,
    layouts,
    prompt_form,
    register_layout_row,
)
from mmsynth.evaluate.bench.results import RowResult
from mmsynth.evaluate.detect import Detection
from mmsynth.evaluate.layout_metrics import average_precision, iou_matrix, match_layout
from mmsynth.evaluate.scoring import Metric

A, B = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]


def _det(phrase: str, box: list[float], score: float = 0.9) -> Detection:
    color, shape = phrase.split()
    return Detection(color, shape, "large", tuple(v * 64 for v in box), tuple(box), ((box[0] + box[2]) / 2,
                     (box[1] + box[3]) / 2), 0.2, 0.0, score, 1.0, 100)  # fmt: skip


def _shift(box: list[float], dx: float) -> list[float]:
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


@pytest.fixture(scope="module")
def cases():
    return make_cases("layout", 4, seed=0)


def _ctx(bundle, steps=2):
    return RunContext(bundle_obj=bundle, sampler=SamplerSettings(steps=steps))


# ---------------------------------------------------------------- metrics on constructed detections
def test_perfect_detections_score_ap_1_and_iou_1():
    gt = [([A, B], ["red circle", "blue square"]), ([A], ["red circle"])]
    dets = [([A, B], ["red circle", "blue square"], [0.9, 0.8]), ([A], ["red circle"], [0.7])]
    assert average_precision(gt, dets) == pytest.approx(1.0)
    assert match_layout([A, B], ["red circle", "blue square"], [B, A], ["blue square", "red circle"]) == [
        (1, 1.0), (0, 1.0)]  # fmt: skip
    np.testing.assert_allclose(iou_matrix([A, B], [A, B]), np.eye(2))


def test_shifted_boxes_score_ap_0_below_iou_half_and_wrong_colours_miss_the_phrase():
    far = _shift(A, 0.15)  # IoU 1/3 < 0.5
    assert iou_matrix([A], [far])[0, 0] == pytest.approx(1 / 3)
    assert average_precision([([A], ["red circle"])], [([far], ["red circle"], [0.9])]) == 0.0
    assert match_layout([A], ["red circle"], [far], ["red circle"]) == [(0, pytest.approx(1 / 3))]
    near = _shift(A, 0.05)  # IoU 0.71: still a hit at 0.5
    assert average_precision([([A], ["red circle"])], [([near], ["red circle"], [0.9])]) == pytest.approx(1.0)
    # the right box, the wrong colour: no detection of the phrase, so no match, IoU 0, and AP 0
    assert match_layout([A], ["red circle"], [A], ["blue circle"]) == [(None, 0.0)]
    assert average_precision([([A], ["red circle"])], [([A], ["blue circle"], [0.9])]) == 0.0
    assert np.isnan(average_precision([([], [])], [([A], ["red circle"], [0.9])]))  # no ground truth at all


def test_ap_ranks_by_score_and_counts_classes_with_ground_truth_only():
    gt = [([A, B], ["red circle", "red circle"])]
    # a false positive ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1, made monotone from the right
    fp_first = [([_shift(A, 0.3), A, B], ["red circle"] * 3, [0.99, 0.9, 0.8])]
    fp_last = [([_shift(A, 0.3), A, B], ["red circle"] * 3, [0.1, 0.9, 0.8])]
    assert average_precision(gt, fp_last) == pytest.approx(1.0)
    assert average_precision(gt, fp_first) == pytest.approx(2 / 3)
    # a phrase only ever detected (never laid out) adds no class, as in COCO
    assert average_precision(gt, [([A, B, B], ["red circle", "red circle", "green star"], [1, 1, 1])]) == 1.0
    # one detection cannot fill two boxes of its phrase: the second box is missed
    big = [0.1, 0.1, 0.9, 0.9]
    pairs = match_layout([A, B, big], ["red circle"] * 3, [big], ["red circle"])
    assert [j for j, _ in pairs] == [None, None, 0] and pairs[2][1] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None, reason="pycocotools (COCOeval) not installed")
def test_ap_is_cocoevals_ap50_on_random_sets():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def coco(gts, dets):
        cat = {p: i + 1 for i, p in enumerate(sorted({p for _, ps in gts for p in ps} | {p for _, ps, _ in dets
                                                                                         for p in ps}))}  # fmt: skip
        xywh = lambda b: [b[0] * 1000, b[1] * 1000, (b[2] - b[0]) * 1000, (b[3] - b[1]) * 1000]  # noqa: E731
        images, anns, res = [], [], []
        for i, ((gb, gp), (db, dp, ds)) in enumerate(zip(gts, dets)):
            images.append({"id": i + 1})
            anns += [{"id": len(anns) + k + 1, "image_id": i + 1, "category_id": cat[p], "bbox": xywh(b),
                      "area": xywh(b)[2] * xywh(b)[3], "iscrowd": 0} for k, (b, p) in enumerate(zip(gb, gp))]
            res += [{"image_id": i + 1, "category_id": cat[p], "bbox": xywh(b), "score": s}
                    for b, p, s in zip(db, dp, ds)]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            g = COCO()
            g.dataset = {"images": images, "annotations": anns,
                         "categories": [{"id": v, "name": k} for k, v in cat.items()]}  # fmt: skip
            g.createIndex()
            e = COCOeval(g, g.loadRes(res), "bbox")
            e.params.iouThrs = np.array([0.5])
            e.evaluate()
            e.accumulate()
        p = e.eval["precision"][0, :, :, 0, -1]
        return float(np.mean(p[p > -1]))

    rng = np.random.default_rng(0)
    phrases = ["red circle", "blue square", "green star"]

    def box():
        x, y = rng.uniform(0, 0.6, 2)
        w, h = rng.uniform(0.1, 0.3, 2)
        return [x, y, x + w, y + h]

    for _ in range(30):
        gts, dets = [], []
        for _ in range(int(rng.integers(1, 5))):
            gb = [box() for _ in range(int(rng.integers(1, 4)))]
            gp = [phrases[rng.integers(3)] for _ in gb]
            db = [list(np.clip(np.array(b) + rng.normal(0, 0.05, 4), 0, 1)) for b in gb] + [box()]
            db = [[b[0], b[1], max(b[2], b[0] + 0.01), max(b[3], b[1] + 0.01)] for b in db]
            dp = [p if rng.random() < 0.8 else phrases[rng.integers(3)] for p in gp] + [phrases[rng.integers(3)]]
            gts.append((gb, gp))
            dets.append((db, dp, [round(float(rng.random()), 1) for _ in db]))  # ties too
        assert average_precision(gts, dets) == pytest.approx(coco(gts, dets), abs=1e-12)


def test_row_metrics_and_verdicts_from_detections(cases):
    case = cases[1]  # two objects
    lay = case_layout(case)
    right = [_det(p, list(b)) for b, p in zip(lay.boxes, lay.phrases)]
    wrong = [_det("green " + p.split()[1] if not p.startswith("green") else "red " + p.split()[1], list(b))
             for b, p in zip(lay.boxes, lay.phrases)]  # fmt: skip
    good, bad = judge(case, None, right), judge(case, None, wrong)
    assert good.ok and good.hits == [True, True] and bad.hits == [False, False] and not bad.ok
    m = layout_metrics([good, bad])
    # per phrase, half its boxes are found (by top-scoring detections): precision 1 up to recall 0.5, then 0
    assert m["ap50"].value == pytest.approx(51 / 101) and m["ap50"].n == 4
    assert m["phrase_acc"].value == 0.5 and m["layout_acc"].value == 0.5 and m["mean_iou"].value == 0.5
    assert m["phrase_acc"].low < 0.5 < m["phrase_acc"].high  # rates carry Wilson intervals
    d = json.loads(json.dumps(good.to_dict()))
    assert d["passed"] and d["n_boxes"] == 2 and d["boxes"][0]["hit"] and d["boxes"][0]["phrase"] == lay.phrases[0]


# ---------------------------------------------------------------- cases
def test_cases_are_hidden_seed_test_layouts_with_one_to_four_boxes(tmp_path, cases):
    more = make_cases("layout", 8, seed=0)
    assert [c.to_dict() for c in more[:4]] == [c.to_dict() for c in cases]  # case j does not depend on n
    assert [len(c.scene.objects) for c in more] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert all(c.scene.split == "test" and c.layout and c.category == "layout" for c in more)
    assert len({c.seed for c in more}) == 8 and all(960_000 <= c.seed < 1_000_003 for c in more)
    other = make_cases("layout", 2, seed=1)
    assert other[0].seed == 1_000_003 + 960_000 and other[0].scene.to_dict() != cases[0].scene.to_dict()
    for c in more:
        lay = case_layout(c)
        assert lay.phrases == [o.phrase for o in c.scene.objects]
        assert lay.boxes == [list(o.box()) for o in c.scene.objects]
        assert all(prompt_form(c.prompt, p) for p in lay.phrases)  # every phrase is words of the prompt
        check(c)
    write_cases(more, tmp_path / "c.jsonl")
    back = read_cases(tmp_path / "c.jsonl")
    assert [c.to_dict() for c in back] == [c.to_dict() for c in more]
    assert [case_layout(c) for c in back] == [case_layout(c) for c in more]  # the same layouts after a round trip


def test_phrases_as_the_prompt_writes_them_and_bad_layouts_are_refused(cases):
    assert prompt_form("a picture of two purple stars", "purple star") == "purple stars"
    assert prompt_form("a large red circle left of a blue square", "red circle") == "red circle"
    assert prompt_form("a red circles", "blue circle") is None
    assert prompt_form("a bred circle", "red circle") is None  # whole words only
    boxes, phrases = layouts(cases, as_written=True)
    assert len(boxes) == len(phrases) == len(cases) and [len(b) for b in boxes] == [1, 2, 3, 4]
    assert all(p in c.prompt for c, ps in zip(cases, phrases) for p in ps)
    c = cases[0]
    with pytest.raises(InputError, match="is not words of the prompt"):
        check(dataclasses.replace(c, prompt="a green cross"))
    bad = dataclasses.replace(c, extra={"layout": {"objects": [{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "a cat"}]}})
    with pytest.raises(InputError, match="is not '<colour> <shape>'"):
        check(bad)
    with pytest.raises(InputError, match=r"extra\.layout.*box 0"):
        check(dataclasses.replace(c, extra={"layout": {"objects": [{"box": [0.5, 0.1, 0.1, 0.5],
                                                                    "phrase": "red circle"}]}}))  # fmt: skip


def test_forward_controls_give_each_image_its_own_layout(bundle, cases):
    suite = get_suite("layout")
    assert {"ground_truth", "vae_ceiling", "no_control", "forward"} <= set(suite.rows)
    assert suite.cost_baseline == "no_control" and suite.quick_n == 4
    planned, _ = plan(cases, _ctx(bundle), RunOptions(rows=["forward"], sweeps={"layout_strength": [0.0, 1.0]}))
    assert [p.row.name for p in planned] == ["forward", "forward[layout_strength=0]", "forward[layout_strength=1]"]
    ctx = RunContext(params={"layout_strength": 0.7, "end": 0.5})
    (control,) = forward_controls(ctx, cases)
    assert control.name == "layout-attention" and control.strength == 0.7 and control.schedule.end == 0.5
    assert control.boxes == [case_layout(c).boxes for c in cases]
    assert control.phrases == layouts(cases, as_written=True)[1]


# ---------------------------------------------------------------- rows, end to end
def test_ground_truth_scores_near_one_and_rows_share_their_cases(bundle, cases):
    res = run_bench(cases, _ctx(bundle), RunOptions(rows=["ground_truth", "no_control", "forward"], panels=2))
    rows = {r.row: r for r in res.rows}
    assert list(rows) == ["ground_truth", "no_control", "forward"]
    gt = rows["ground_truth"].metrics
    assert gt["ap50"].value == pytest.approx(1.0) and gt["phrase_acc"].value == 1.0 and gt["mean_iou"].value > 0.9
    assert gt["fd_shapesclip"].value == pytest.approx(0.0, abs=1e-3)  # the renders against themselves
    for name in ("no_control", "forward"):
        r = rows[name]
        assert r.n_cases == 4 and not r.skipped
        assert {"ap50", "mean_iou", "phrase_acc", "layout_acc", "fd_shapesclip", "kid_shapesclip",
                "cost_ratio"} <= set(r.metrics)  # fmt: skip
        assert 0.0 <= r.metrics["ap50"].value <= 1.0
    assert rows["no_control"].metrics["cost_ratio"].value == pytest.approx(1.0)
    assert "cost_ratio" not in gt  # no model call: no cost
    ids = [[rec["case"] for rec in r.cases] for r in res.rows]
    assert ids[0] == ids[1] == ids[2] == [c.id for c in cases]  # the same layouts for every row
    assert all("verdict" in rec and "ok" in rec for rec in rows["forward"].cases)
    assert rows["forward"].settings["layout_strength"] == 0.5
    panel = rows["forward"].panels[0]
    assert [t for t, _ in panel.tiles][:2] == ["layout", "output"] and panel.tiles[2][0].startswith("judge: ")
    assert panel.tiles[0][1].shape == (128, 128, 3) and panel.tiles[0][1].any()
    notes = res.notes["layout"]
    assert notes[0].startswith("at least 300 test layouts (1-4 boxes) per row: NOT met (4)")
    assert any(n.startswith("gligen: AP50 >= 0.8") and "not measured" in n for n in notes)
    assert "| forward | method | 4 |" in res.markdown()


def test_a_registered_layout_row_is_a_few_lines_and_batches(bundle, cases):
    seen = []

    def controls(ctx, batch):
        seen.append(([c.id for c in batch], dict(ctx.params), layouts(batch)[1]))
        return []

    suite = get_suite("layout")
    try:
        row = register_layout_row("dummy", "no controls at all", controls, params={"k": 2})
        assert suite.rows["dummy"] is row and row.sweepable[0] == "k" and "cfg" in row.sweepable
        res = run_bench(cases, dataclasses.replace(_ctx(bundle), batch_size=4), RunOptions(rows=["dummy"]))
    finally:
        suite.rows.pop("dummy", None)
    assert seen == [([c.id for c in cases], {"k": 2}, [case_layout(c).phrases for c in cases])]  # one batch
    assert res.rows[0].row == "dummy" and res.rows[0].n_cases == 4
    assert "dummy" not in get_suite("layout").rows


def test_bars_are_read_from_the_rows():
    def row(name, n=300, **metrics):
        return RowResult("layout", name, "method", "", {k: Metric(v, 10) for k, v in metrics.items()}, n_cases=n)

    notes = bar_notes([row("no_control", ap50=0.2), row("gligen", ap50=0.85, phrase_acc=0.9),
                       row("backward", ap50=0.35)])  # fmt: skip
    assert notes[0] == "at least 300 test layouts (1-4 boxes) per row: met (300)"
    assert notes[1] == "gligen: AP50 >= 0.8 and phrase accuracy >= 0.85: met (AP50 0.850, phrase accuracy 0.900)"
    assert notes[2] == "backward: AP50 at least twice no_control's: NOT met (0.350 vs 0.200)"


def test_cli_makes_layout_cases(tmp_path):
    assert main(["bench", "make-cases", "--suite", "layout", "--n", "2", "--out", str(tmp_path / "c.jsonl")]) == 0
    back = read_cases(tmp_path / "c.jsonl")
    assert [c.to_dict() for c in back] == [c.to_dict() for c in make_cases("layout", 2, seed=0)]


def test_every_method_row_runs_and_gligen_rows_need_the_component(bundle, cases):
    """backward and regional run on any text model; gligen and gligen_backward skip, with the reason, on a model
    without the gligen component and run with it."""
    from mmsynth.models.zoo import build_gligen_unet

    rows = ["backward", "regional", "gligen", "gligen_backward"]
    res = run_bench(cases[:2], _ctx(bundle), RunOptions(rows=rows))
    got = {r.row: r for r in res.rows}
    assert got["backward"].n_cases == 2 and got["regional"].n_cases == 2
    assert got["gligen"].n_cases == 0 and "gligen" in json.dumps(got["gligen"].skipped)
    with_gligen = dataclasses.replace(bundle, extras={"gligen": build_gligen_unet(bundle.unet)})
    res = run_bench(cases[:2], _ctx(with_gligen), RunOptions(rows=["gligen", "gligen_backward"]))
    assert [r.n_cases for r in res.rows] == [2, 2]
    assert res.rows[0].settings["beta"] == 0.3 and res.rows[1].settings["layout_eta"] == 30.0


def test_planned_t2i_rows_plan_each_prompt_and_draw_it_with_a_layout_method(bundle):
    from mmsynth.evaluate.bench.t2i import planned_controls

    t2i_cases = [c for c in make_cases("t2i", 2, seed=0) if c.category in ("count", "relation")]
    (control,) = planned_controls("backward")(RunContext(params={}), t2i_cases)
    assert control.name == "layout-guidance" and len(control.boxes) == len(t2i_cases)
    (control,) = planned_controls("gligen")(RunContext(params={"beta": 0.5}), t2i_cases)
    assert control.name == "gligen" and control.schedule.end == 0.5
    res = run_bench(t2i_cases[:2], _ctx(bundle), RunOptions(rows=["planned_backward", "planned"]))
    got = {r.row: r.n_cases for r in res.rows}
    assert got == {"planned_backward": 2, "planned": 0}  # the tiny bundle has no gligen component
