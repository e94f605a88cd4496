"""The Shapes world: spec -> render -> annotations, captions and their parser, exports, bad input."""

import json

import numpy as np
import pytest

from mmsynth.cli.main import main
from mmsynth.data import vocab
from mmsynth.data.annotations import annotate_scene, depth_value
from mmsynth.data.captions import captions, expected_from_scene, parse_caption
from mmsynth.data.export import export_split, read_metadata
from mmsynth.data.render import render, render_scene
from mmsynth.data.scene import (
    MAX_HIDDEN_FRACTION,
    Scene,
    group_relations,
    groups,
    relation_holds,
    sample_scene,
    visible_fractions,
)
from mmsynth.data.torch_dataset import ShapesDataset, collate
from mmsynth.errors import InputError


def test_spec_is_pure_and_json_round_trips():
    a, b = sample_scene("train", 17, 3), sample_scene("train", 17, 3)
    assert a.to_dict() == b.to_dict()
    assert sample_scene("train", 17, 4).to_dict() != a.to_dict()
    back = Scene.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()
    assert np.array_equal(render(a), render(back))


def test_scene_constraints_hold_over_many_scenes():
    seen_n = set()
    for i in range(300):
        s = sample_scene("train", i)
        seen_n.add(len(s.objects))
        assert min(visible_fractions(s.objects)) >= 1 - MAX_HIDDEN_FRACTION
        for o in s.objects:
            assert (o.color, o.shape) not in vocab.HELDOUT_COMBOS
            lo, hi = vocab.SIZE_RADIUS[o.size]
            assert lo <= o.radius <= hi
        if len(groups(s)) > 1:
            assert group_relations(s), "multi-group scenes must have a relation to state"
    assert seen_n == {1, 2, 3, 4}


def test_heldout_split_always_has_a_heldout_combo():
    for i in range(50):
        s = sample_scene("heldout", i)
        assert any((o.color, o.shape) in vocab.HELDOUT_COMBOS for o in s.objects)


def test_backgrounds_never_collide_with_object_colours():
    from skimage.color import rgb2lab

    for i in range(60):
        s = sample_scene("val", i)
        r = render_scene(s, 64)
        lab = rgb2lab(r.image)
        chroma = np.hypot(lab[..., 1], lab[..., 2])
        pure_bg = r.coverage.sum(axis=0) < 1e-3  # pixels no object touches, not even anti-aliased
        assert chroma[pure_bg].max() < 12  # background stays achromatic
        assert np.median(chroma[r.instance > 0]) > 25  # objects are chromatic (cyan is the weakest, ~30)


def test_render_any_resolution_and_annotations_agree():
    s = sample_scene("test", 5)
    for res in (32, 64, 200, 512):
        a = annotate_scene(s, res)
        assert a.image.shape == (res, res, 3) and a.image.dtype == np.uint8
        inst = a.maps["instance"]
        assert set(np.unique(inst)) <= set(range(len(s.objects) + 1))
        assert np.array_equal(a.maps["semantic"] > 0, inst > 0)
        for k, o in enumerate(s.objects):
            m = inst == k + 1
            if m.any():
                assert (a.maps["semantic"][m] == vocab.SHAPES.index(o.shape) + 1).all()
                assert (a.maps["depth"][m] == depth_value(k)).all()
                ys, xs = np.nonzero(m)  # the visible pixels lie inside the amodal box
                x0, y0, x1, y1 = a.records["objects"][k]["box"]
                assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
        assert set(np.unique(a.maps["edges"])) <= {0, 255}
    with pytest.raises(InputError, match="resolution"):
        render(s, 16)


def test_render_is_antialiased():
    s = sample_scene("train", 0)
    img = render(s, 64)
    bg = np.array(s.background.colors[0])
    fg = np.array(s.objects[0].rgb)
    d = np.abs(img.astype(int) - fg).sum(-1)
    mixed = (d > 30) & (np.abs(img.astype(int) - bg).sum(-1) > 30)
    assert mixed.sum() > 5  # edge pixels are blends, not a hard binary render


def test_captions_are_true_and_parse_back():
    for i in range(400):
        s = sample_scene("train", i)
        exp = expected_from_scene(s)
        key = sorted((g.count, g.color, g.shape) for g in exp.groups)
        caps = captions(s)
        assert len(set(caps)) >= 2
        for c in caps:
            p = parse_caption(c)
            assert sorted((g.count, g.color, g.shape) for g in p.groups) == key, c
            if len(exp.groups) > 1:
                assert p.relations, c
            for a, rel, b in p.relations:  # every stated relation really holds
                ga, gb = p.groups[a], p.groups[b]
                ma = [o for o in s.objects if (o.color, o.shape) == (ga.color, ga.shape)]
                mb = [o for o in s.objects if (o.color, o.shape) == (gb.color, gb.shape)]
                assert all(relation_holds(x, y, rel) for x in ma for y in mb), c
            for g in p.groups:
                if g.size:
                    assert all(o.size == g.size for o in s.objects if (o.color, o.shape) == (g.color, g.shape))


def test_parse_caption_grammar_and_errors():
    p = parse_caption("two red circles left of a blue square")
    assert [(g.count, g.color, g.shape) for g in p.groups] == [(2, "red", "circle"), (1, "blue", "square")]
    assert p.relations == [(0, "left of", 1)]
    p = parse_caption(
        "There are three objects: a large green star, an orange cross and a pink triangle, "
        "with the green star above the pink triangle."
    )
    assert p.total == 3 and p.groups[0].size == "large" and p.relations == [(0, "above", 2)]
    text = "There are three objects: a large green star, an orange cross and a pink triangle, with the green star "
    text += "above the pink triangle"
    named = [(g, text[a:b]) for g, a, b in parse_caption(text).mentions]
    assert named == [(0, "a large green star"), (1, "an orange cross"), (2, "a pink triangle"), (0, "the green star"),
                     (2, "the pink triangle")]  # character spans of each group phrase, back-references included
    assert parse_caption(text).mention_relations == [None, None, None, None, "above"]
    assert parse_caption("a red circle to the left of a blue square").mention_relations == [None, "left of"]
    assert parse_caption("").groups == []
    for bad, what in [("two red", "shape"), ("a red circles", "disagree"), ("a mauve circle", "colour"),
                      ("hello world", "unexpected word"), ("three objects: a red circle", "says 3")]:  # fmt: skip
        with pytest.raises(InputError, match=what):
            parse_caption(bad)


def test_scene_validation_names_the_field():
    d = sample_scene("train", 1).to_dict()
    d["objects"][0]["color"] = "mauve"
    with pytest.raises(InputError, match=r"objects\[0\]\.color.*red"):
        Scene.from_dict(d)
    d = sample_scene("train", 1).to_dict()
    d["objects"][0]["cx"] = 3
    with pytest.raises(InputError, match=r"cx.*out of range"):
        Scene.from_dict(d)
    with pytest.raises(InputError, match="split"):
        sample_scene("nope", 0)


def test_imagefolder_round_trip(tmp_path):
    import datasets

    out = export_split("val", 5, tmp_path / "ds", progress=False)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 5
    row = ds[2]
    scene = Scene.from_dict(row["scene"])
    assert np.array_equal(np.asarray(row["image"]), render(scene, 64))
    ann = annotate_scene(scene, 64)
    for name in ("semantic", "edges", "depth"):
        assert np.array_equal(np.asarray(row[name]), ann.maps[name])
    assert row["caption"] in row["captions"]
    assert len(read_metadata(out)) == 5


def test_export_refuses_to_clobber_and_leaves_nothing_on_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["data", "export", "--n", "2", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "x").read_text() == "keep"
    assert main(["data", "export", "--split", "bogus", "--n", "2", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_read_metadata_names_bad_lines(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{not json\n')
    with pytest.raises(InputError, match=r"metadata.jsonl line 2 is not valid JSON"):
        read_metadata(tmp_path)


def test_cli_show_spec_render(tmp_path, capsys):
    assert main(["data", "show", "--n", "2", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()
    capsys.readouterr()
    assert main(["data", "spec", "--split", "test", "--index", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert main(["data", "render", str(tmp_path / "s.json"), "--resolution", "96", "-o", str(tmp_path / "r.png")]) == 0
    (tmp_path / "bad.json").write_text("{oops")
    assert main(["data", "render", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_torch_datasets_are_seeded_and_worker_safe():
    from torch.utils.data import DataLoader

    ds = ShapesDataset("train", length=4)
    a, b = ds[1], ShapesDataset("train", length=4)[1]
    assert a["caption"] == b["caption"] and (a["pixel_values"] == b["pixel_values"]).all()
    assert a["pixel_values"].shape == (3, 64, 64) and a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    assert len(ShapesDataset("train")) == 2**62 and len(ds) == 4  # endless unless sized
    with pytest.raises(IndexError):
        ds[4]
    dl = DataLoader(ShapesDataset("train"), sampler=range(10, 18), batch_size=4, num_workers=2, collate_fn=collate)
    it = iter(dl)
    seen = next(it)["index"] + next(it)["index"]
    assert sorted(seen) == list(range(10, 18))


def test_memoised_polygons_are_read_only_and_equal_to_fresh_ones():
    """Outlines are cached for speed; a caller writing into one must fail instead of corrupting later scenes."""
    from mmsynth.data.geometry import _unit_polygon, polygon

    pts = polygon("star", 0.4, 0.6, 0.2, 10.0)
    assert pts is polygon("star", 0.4, 0.6, 0.2, 10.0)
    with pytest.raises(ValueError):
        pts[0, 0] = 0.0
    th = np.radians(10.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    np.testing.assert_allclose(pts, _unit_polygon("star") @ rot.T * 0.2 + [0.4, 0.6])


def test_image_only_paths_give_the_annotated_pixels_and_captions():
    """`render` and a map-less training example skip the label maps for speed; they must not change a pixel."""
    import torch


    for i in range(12):
        s = sample_scene("test", i, 4)
        for res in (32, 64, 96):
            assert np.array_equal(render(s, res), render_scene(s, res).image)
        fast, full = ShapesDataset("train", 5, 64)[i], ShapesDataset("train", 5, 64, maps=("semantic",))[i]
        assert torch.equal(fast["pixel_values"], full["pixel_values"])
        assert (fast["caption"], fast["captions"], fast["scene"]) == (full["caption"], full["captions"], full["scene"])
        assert "semantic" not in fast and full["semantic"].shape == (64, 64)


def test_minimal_edit_changes_one_attribute_and_keeps_the_rules():
    from mmsynth.data.captions import caption_true_of
    from mmsynth.data.scene import minimal_edit

    rng = np.random.default_rng(0)
    kinds = set()
    for split in ("train", "heldout"):
        for i in range(60):
            s = sample_scene(split, i, 2)
            t = minimal_edit(s, rng)
            if t is None:
                continue
            diff = [(a, b) for a, b in zip(s.objects, t.objects) if a != b]
            assert len(diff) == 1 and t.background == s.background and t.split == s.split
            (a, b), = diff
            kinds.add("shape" if a.shape != b.shape else "colour")
            assert (a.shape == b.shape) != (a.color == b.color)
            combos = {(o.color, o.shape) for o in t.objects}
            assert bool(combos & vocab.HELDOUT_COMBOS) == (split == "heldout")
            assert min(visible_fractions(t.objects)) >= 1 - MAX_HIDDEN_FRACTION
            assert len(groups(t)) == 1 or group_relations(t)
            assert not any(caption_true_of(c, s) for c in captions(t, 4))  # a true negative of the source
    assert kinds == {"shape", "colour"}


def test_a_place_edit_swaps_two_objects_of_different_groups_and_flips_their_relation():
    from mmsynth.data.captions import caption_true_of
    from mmsynth.data.scene import group_relations, minimal_edit, relation_holds

    rng = np.random.default_rng(1)
    swapped = 0
    for i in range(40):
        s = sample_scene("train", i, 5, n_objects=2)
        t = minimal_edit(s, rng, kinds=("place",))
        if len(groups(s)) == 1:
            assert t is None  # one colour-shape group: a swap changes nothing a caption can say
            continue
        assert minimal_edit(sample_scene("train", i, 5, n_objects=3), rng, kinds=("place",)) is None
        if t is None:
            continue
        a, b = s.objects
        assert (t.objects[0].cx, t.objects[0].cy, t.objects[1].cx, t.objects[1].cy) == (b.cx, b.cy, a.cx, a.cy)
        assert [(o.color, o.shape, o.size, o.radius, o.rotation) for o in t.objects] == \
            [(o.color, o.shape, o.size, o.radius, o.rotation) for o in s.objects]  # fmt: skip
        (x,), (y,) = groups(s)
        for gx, rel, _gy in group_relations(s):  # no relation between the two still holds
            first, second = (x, y) if gx == 0 else (y, x)
            assert not relation_holds(t.objects[first], t.objects[second], rel)
        assert not any(caption_true_of(c, s) for c in captions(t, 4))
        swapped += 1
    assert swapped >= 20
    with pytest.raises(InputError, match="edit kinds must be some of shape, colour, place, count"):
        minimal_edit(sample_scene("train", 0, 5), rng, kinds=("size",))


def test_shape_swapped_captions_change_one_group_everywhere_and_are_false_of_the_scene():
    from mmsynth.data.captions import caption_true_of, shape_swapped

    swaps = shape_swapped("two red circles and a red square, with the two red circles over the red square")
    assert "two red crosses and a red square, with the two red crosses over the red square" in swaps
    assert "two red circles and a red star, with the two red circles over the red star" in swaps
    assert len(swaps) == 6  # circles -> 3 shapes (not square: named), square -> 3 (not circle)
    assert shape_swapped("there is a large blue star") == [f"there is a large blue {s}" for s in
                                                           ("circle", "square", "triangle", "cross")]  # fmt: skip
    checked = 0
    for i in range(30):
        s = sample_scene("train", i, 6)
        for c in captions(s, 2):
            for f in shape_swapped(c):
                assert f != c and not caption_true_of(f, s) and parse_caption(f).groups
                checked += 1
    assert checked >= 100


def test_flip_relations_reverses_every_relation_and_makes_a_false_caption():
    from mmsynth.data.captions import caption_true_of, flip_relations

    assert flip_relations("there is a red circle to the left of a blue square") == \
        "there is a red circle to the right of a blue square"  # fmt: skip
    assert flip_relations("a red star, a blue circle, with the red star over the blue circle") == \
        "a red star, a blue circle, with the red star under the blue circle"  # fmt: skip
    assert flip_relations("three green stars") is None
    flipped = 0
    for i in range(40):
        s = sample_scene("train", i, 4)
        for c in captions(s, 2):
            f = flip_relations(c)
            if f is not None:
                assert parse_caption(f).relations and not caption_true_of(f, s)
                flipped += 1
    assert flipped >= 20


def test_a_count_edit_adds_a_like_object_or_removes_one_and_no_source_caption_stays_true():
    from mmsynth.data.captions import caption_true_of
    from mmsynth.data.scene import minimal_edit

    rng = np.random.default_rng(3)
    seen = {"more": 0, "fewer": 0}
    for split in ("train", "heldout"):
        for i in range(40):
            s = sample_scene(split, i, 4)
            t = minimal_edit(s, rng, kinds=("count",))
            if t is None:
                continue
            assert abs(len(t.objects) - len(s.objects)) == 1 and t.background == s.background
            if len(t.objects) > len(s.objects):
                assert t.objects[:-1] == s.objects  # the others kept, the new one like an existing one
                assert (t.objects[-1].color, t.objects[-1].shape) in {(o.color, o.shape) for o in s.objects}
                seen["more"] += 1
            else:
                assert all(o in s.objects for o in t.objects)
                seen["fewer"] += 1
            combos = {(o.color, o.shape) for o in t.objects}
            assert bool(combos & vocab.HELDOUT_COMBOS) == (split == "heldout")
            assert min(visible_fractions(t.objects)) >= 1 - MAX_HIDDEN_FRACTION
            assert not any(caption_true_of(c, s) for c in captions(t, 4))
            assert not any(caption_true_of(c, t) for c in captions(s, 4))
    assert seen["more"] >= 10 and seen["fewer"] >= 10
