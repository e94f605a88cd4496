"""Component scores: the caption-truth rule behind retrieval, and both scores on tiny models."""

import dataclasses

from mmsynth.data import captions, sample_scene
from mmsynth.data.captions import caption_true_of
from mmsynth.data.scene import Background, Scene, ShapeObject
from mmsynth.evaluate.components import (
    CAPTION_KINDS,
    MISS_KINDS,
    caption_kind,
    clip_retrieval,
    ideal_image_embeddings,
    lost_object_sizes,
    miss_lines,
    retrieval_miss,
    shape_swaps,
    vae_psnr,
    with_interval,
)
from mmsynth.models.zoo import text_features, tiny_bundle


def _scene(*objs):
    return Scene(objects=list(objs), background=Background("light", [(230, 230, 230)]))


def test_caption_truth_rule():
    a = ShapeObject("circle", "red", "small", 0.25, 0.5, 0.12)
    b = ShapeObject("square", "blue", "large", 0.75, 0.5, 0.19)
    s = _scene(a, b)
    assert caption_true_of("a red circle left of a blue square", s)
    assert not caption_true_of("a red circle right of a blue square", s)
    assert not caption_true_of("a red circle", s)  # the caption must name every object
    assert not caption_true_of("a large red circle and a blue square", s)  # stated size is wrong
    assert not caption_true_of("two red circles and a blue square", s)
    for i in range(100):  # every dataset caption is true of its own scene
        sc = sample_scene("test", i)
        assert all(caption_true_of(c, sc) for c in captions(sc))


def test_component_scores_run_on_tiny_models():
    b = tiny_bundle(0)
    r = vae_psnr(b.vae, n=4, resolution=32)
    assert 0 < r["psnr_db"]["value"] < 60 and r["psnr_db"]["n"] == 4
    assert r["judge_pass"]["n"] == 4 and 0 <= r["judge_pass"]["value"] <= 1
    ret = clip_retrieval(b.clip, b.tokenizer, n=6, resolution=32)
    for key in ("top1_exact", "top1_consistent"):
        assert 0.0 <= ret[key]["value"] <= 1.0 and ret[key]["n"] == 6
    assert ret["top1_consistent"]["value"] >= ret["top1_exact"]["value"]  # its own image always makes it true
    by_kind = ret["consistent_by_kind"]
    assert sum(r["n"] for r in by_kind.values()) == 6 and set(by_kind) <= set(CAPTION_KINDS)
    hits = sum(round(r["value"] * r["n"]) for r in by_kind.values())
    assert hits == round(ret["top1_consistent"]["value"] * 6)  # the kinds partition the cases
    assert set(ret["misses"]) <= set(MISS_KINDS)
    assert sum(ret["misses"].values()) == 6 - round(ret["top1_consistent"]["value"] * 6)  # one name per miss
    assert all("->" in k for k in ret["shape_swaps"]) and sum(ret["shape_swaps"].values()) >= ret["misses"].get(
        "a shape", 0)  # every shape miss names at least one swap
    assert miss_lines(ret)[0].startswith("wrong retrievals, by what differs: ")
    assert sum(ret["object_sizes"].values()) == sum(len(sample_scene("test", i, 0).objects) for i in range(6))
    assert bool(ret["shape_miss_sizes"]) == bool(ret["misses"].get("a shape"))  # a shape miss loses an object
    # the swaps and the sizes lines only when there are shape misses
    assert len(miss_lines(ret)) == 1 + bool(ret["shape_swaps"]) + bool(ret["shape_miss_sizes"])
    assert set(ret["text_side_ceiling"]) == {"prototype", "fitted"}
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] == 6 for r in ret["text_side_ceiling"].values())


def test_a_text_tower_that_tells_captions_apart_has_a_full_ceiling_and_one_that_cannot_has_not():
    """The ceiling embeds images from their scenes' other captions: a text tower that writes each scene's groups
    into its embedding retrieves nearly every caption, one that sees only the first group retrieves few; on
    the first, image vectors fitted to those captions do at least as well as their mean."""
    import torch

    from mmsynth.data import vocab

    words = [*vocab.COLORS, *vocab.SHAPES, *vocab.SHAPE_PLURALS.values(), *vocab.NUMBER_WORDS.values(), "a", "an",
             "small", "large"]  # fmt: skip

    class BagOfWords:  # a stand-in CLIP: the projected text embedding counts the caption's words
        def __init__(self, first_only: bool = False):
            self.first_only = first_only

        def get_text_features(self, input_ids):
            return input_ids.float()

        def parameters(self):
            return iter([torch.zeros(1)])

    class Tokens:  # what tokenize_padded asks of a tokenizer
        model_max_length = 1

        def __init__(self, first_only):
            self.first_only = first_only

        def __call__(self, texts, **_):
            from types import SimpleNamespace

            def counts(t):
                ws = t.replace(",", " ").split()
                ws = ws[: next((i + 1 for i, w in enumerate(ws) if w in vocab.COLORS), 0)] if self.first_only else ws
                return [ws.count(w) + 0.01 * (w in ws) for w in words]

            return SimpleNamespace(input_ids=torch.tensor([counts(t) for t in texts]))

    scenes = [sample_scene("test", i) for i in range(60)]
    queries = [captions(s, 1)[0] for s in scenes]
    for first_only, low, high in ((False, 0.9, 1.0), (True, 0.0, 0.6)):
        tok = Tokens(first_only)
        queries_feats = text_features(BagOfWords(), tok, queries)
        rates = {}
        for name, ideal in ideal_image_embeddings(BagOfWords(), tok, scenes, queries).items():
            best = (queries_feats @ ideal.T).argmax(1)
            rates[name] = sum(caption_true_of(q, scenes[int(j)]) for q, j in zip(queries, best)) / len(scenes)
        assert low <= rates["prototype"] <= high and low <= rates["fitted"] <= high, (first_only, rates)
        if not first_only:  # fitted to the captions, the image side does at least as well as their mean
            assert rates["fitted"] >= rates["prototype"], rates


# a small red circle left of a large blue square: the query the miss-naming tests edit
RED_CIRCLE = ShapeObject("circle", "red", "small", 0.25, 0.5, 0.12)
BLUE_SQUARE = ShapeObject("square", "blue", "large", 0.75, 0.5, 0.19)


def test_retrieval_misses_are_named_by_what_differs():
    red_circle, blue_square = RED_CIRCLE, BLUE_SQUARE
    query = _scene(red_circle, blue_square)
    swap = dataclasses.replace
    assert retrieval_miss(query, _scene(red_circle)) == "object count"
    assert retrieval_miss(query, _scene(swap(red_circle, cx=0.75), swap(blue_square, cx=0.25))) == "size or relation"
    assert retrieval_miss(query, _scene(swap(red_circle, shape="star"), blue_square)) == "a shape"
    assert retrieval_miss(query, _scene(swap(red_circle, color="green"), blue_square)) == "a colour"
    assert retrieval_miss(query, _scene(swap(red_circle, color="blue"), swap(blue_square, color="red"))) \
        == "colours bound to other shapes"
    assert retrieval_miss(query, _scene(swap(red_circle, color="green", shape="star"), blue_square)) \
        == "shape and colour"


def test_shape_swaps_name_the_asked_and_the_retrieved_shape_per_colour():
    red_circle, blue_square = RED_CIRCLE, BLUE_SQUARE
    swap = dataclasses.replace
    query = _scene(red_circle, blue_square)
    assert shape_swaps(query, _scene(swap(red_circle, shape="star"), blue_square)) == ["circle->star"]
    assert shape_swaps(query, _scene(swap(red_circle, shape="star"), swap(blue_square, shape="cross"))) \
        == ["square->cross", "circle->star"]  # colours in sorted order: blue, red
    assert shape_swaps(query, query) == []
    two_red = _scene(red_circle, swap(red_circle, cx=0.75))
    assert shape_swaps(two_red, _scene(red_circle, swap(red_circle, shape="cross", cx=0.75))) == ["circle->cross"]


def test_lost_object_sizes_name_the_sizes_of_the_groups_the_retrieved_scene_lacks():
    red_circle, blue_square = RED_CIRCLE, BLUE_SQUARE
    swap = dataclasses.replace
    query = _scene(red_circle, blue_square)
    assert lost_object_sizes(query, _scene(swap(red_circle, shape="star"), blue_square)) == ["small"]
    assert lost_object_sizes(query, _scene(red_circle, swap(blue_square, shape="cross"))) == ["large"]
    assert lost_object_sizes(query, query) == []
    two_red = _scene(red_circle, swap(red_circle, cx=0.75, size="large"))  # a group lacking one: both its objects
    assert lost_object_sizes(two_red, _scene(red_circle, swap(red_circle, shape="cross"))) == ["small", "large"]
    lines = miss_lines({"misses": {"a shape": 2}, "shape_swaps": {"square->cross": 2},
                        "shape_miss_sizes": {"large": 1, "small": 1}, "object_sizes": {"large": 1, "small": 3}})
    assert lines[-1] == "sizes of the objects those lost: large 1, small 1 (all objects of the queries' scenes: " \
        "large 0.25, small 0.75)"


def test_bench_components_cli(tmp_path, capsys):
    import json

    from mmsynth.cli.main import main

    tiny_bundle(0).save_pretrained(tmp_path / "m")
    assert (
        main(["bench", "components", "--model", str(tmp_path / "m"), "--n", "4", "--json", str(tmp_path / "c.json")])
        == 0
    )
    scores = json.loads((tmp_path / "c.json").read_text())
    assert {"vae", "clip"} <= set(scores)
    assert main(["bench", "components", "--model", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_lossless_autoencoder_scores_the_ceiling_and_a_blurring_one_does_not():
    from types import SimpleNamespace

    import torch

    class Lossless(torch.nn.Module):  # encode/decode are the identity (or a heavy blur)
        def __init__(self, blur: bool = False):
            super().__init__()
            self.blur, self.p = blur, torch.nn.Parameter(torch.zeros(1))

        device, dtype = torch.device("cpu"), torch.float32

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            if self.blur:
                z = torch.nn.functional.avg_pool2d(z, 9, stride=1, padding=4, count_include_pad=False)
            return SimpleNamespace(sample=z)

    exact = vae_psnr(Lossless(), n=6)
    assert exact["psnr_db"]["value"] > 90 and exact["judge_pass"]["value"] == 1.0
    blurred = vae_psnr(Lossless(blur=True), n=6)
    assert blurred["psnr_db"]["value"] < 30 and blurred["judge_pass"]["value"] < 1.0


def test_caption_kinds():
    assert caption_kind("a red circle") == "one object"
    assert caption_kind("there are three blue crosses") == "count"
    assert caption_kind("a red circle left of a blue square") == "two groups"
    assert caption_kind("two red circles above a blue square") == "two groups"
    assert caption_kind("a red circle, a blue square and a green star, with the red circle above the blue square") \
        == "three or more groups"


def test_with_interval_rounds_value_and_bounds_alike() -> None:
    metric = {"value": 0.89549, "ci95": (0.87451, 0.9125), "n": 1000}
    assert with_interval(metric) == "0.895 (95% CI 0.875..0.912)"
    assert with_interval(metric, 1, " dB", ", n=1000") == "0.9 dB (95% CI 0.9..0.9, n=1000)"
