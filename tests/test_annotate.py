"""Annotators: every kind on a Shapes render and on a non-square photo, exactness on Shapes, bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab

import mmsynth.cli.main as cli_main
from mmsynth.annotate import HISTOGRAM_SIZE, annotate, from_scene, get_annotator, lab_bin, list_annotators
from mmsynth.data import annotate_scene, sample_scene
from mmsynth.errors import InputError

# a layout needs boxes and phrases, a colour region a colour the images have; every other kind runs on its defaults
KIND_PARAMS = {"layout": {"boxes": [[0.1, 0.2, 0.6, 0.9]], "phrases": ["red circle"]},
               "color-region": {"color": "blue"}}
IMAGE_KINDS = [a.name for a in list_annotators() if a.name != "depth"]


@pytest.fixture(scope="module")
def shapes() -> np.ndarray:
    return annotate_scene(sample_scene("test", 3), 64, n_captions=1).image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """Non-square, noisy, smooth-plus-detail content: a stand-in for a real photo."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:45, 0:70].astype(np.float32)
    base = np.stack([xx * 3.5, yy * 5.0, 128 + 100 * np.sin(xx / 6) * np.cos(yy / 5)], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `mmsynth ...` through the real entry point with only the annotate command registered."""
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("annotate",))

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def edge_f1(pred: np.ndarray, gt: np.ndarray, tol: int = 1) -> float:
    """F1 of two edge maps where a pixel within `tol` pixels of the other map counts as matched."""
    kernel = np.ones((2 * tol + 1, 2 * tol + 1), np.uint8)
    p, g = pred > 0, gt > 0
    precision = (p & (cv2.dilate(g.astype(np.uint8), kernel) > 0)).sum() / max(p.sum(), 1)
    recall = (g & (cv2.dilate(p.astype(np.uint8), kernel) > 0)).sum() / max(g.sum(), 1)
    return float(2 * precision * recall / max(precision + recall, 1e-9))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@pytest.mark.parametrize("source", ["shapes", "photo"])
def test_every_kind_shape_dtype_range(kind, source, request):
    image = request.getfixturevalue(source)
    spec = get_annotator(kind)
    out = annotate(kind, image, **KIND_PARAMS.get(kind, {}))
    h, w = image.shape[:2]
    if spec.output == "vector":
        assert out.shape == (HISTOGRAM_SIZE,) and out.dtype == np.float32
        assert np.all(out >= 0)
        return
    assert out.dtype == np.uint8
    assert out.shape[:2] == (h, w) and out.ndim in (2, 3)
    if kind in ("canny", "xdog", "lineart", "mask", "color-region"):
        assert set(np.unique(out)) <= {0, 255}
    if kind == "segmentation":
        assert out.max() < spec.param("k").default
    if kind != "layout":  # layout is drawn on black: its content is only the boxes
        assert out.max() > 0


def test_spec_listing_has_parameters_with_ranges():
    specs = {a.name: a for a in list_annotators()}
    assert {"canny", "xdog", "lineart", "softedge", "intensity", "palette", "histogram", "shuffle", "mask",
            "segmentation", "layout", "depth"} <= set(specs)
    canny = specs["canny"]
    assert (canny.param("low").default, canny.param("high").default) == (100, 200)
    assert specs["histogram"].output == "vector" and specs["mask"].output == "mask"
    for a in specs.values():
        for p in a.params:
            assert p.help and p.range_text()


def test_canny_recovers_exact_shapes_edges():
    """Measured: mean F1 ~0.999 and min ~0.99 over 100 test scenes at 64 px (1-px tolerance)."""
    scores = []
    for i in range(20):
        ann = annotate_scene(sample_scene("test", i), 64, n_captions=1)
        scores.append(edge_f1(annotate("canny", ann.image), ann.maps["edges"]))
    assert np.mean(scores) > 0.98 and min(scores) > 0.95


def test_canny_thresholds_matter(shapes):
    assert (annotate("canny", shapes, low=900, high=1000) > 0).sum() < (annotate("canny", shapes) > 0).sum()


def test_histogram_sums_to_one_and_red_lands_in_its_bin():
    red = np.zeros((10, 13, 3), np.uint8)
    red[..., 0] = 255
    hist = annotate("histogram", red)
    assert abs(float(hist.sum()) - 1.0) < 1e-5
    # CIELab of sRGB red (D65) is about (53.2, 80.1, 67.2): L bin 5 of 11 over [0, 100], a and b in the
    # top two of 5 bins over [-128, 128]: (5 * 5 + 4) * 5 + 3
    assert int(np.argmax(hist)) == (5 * 5 + 4) * 5 + 3
    assert hist.max() == pytest.approx(1.0)
    half = red.copy()
    half[:5] = 255  # white has L = 100 -> last L bin, a = b = 0 -> middle bins
    hist = annotate("histogram", half)
    assert hist[(10 * 5 + 2) * 5 + 2] == pytest.approx(5 / 10)


def test_lab_bin_matches_skimage_for_palette_colours():
    lab = rgb2lab(np.array([[[0, 0, 0], [255, 255, 255], [0, 0, 255]]], np.uint8))[0]
    assert lab_bin(lab).tolist()[:2] == [(0 * 5 + 2) * 5 + 2, (10 * 5 + 2) * 5 + 2]


def test_palette_of_flat_image_is_flat_and_keeps_colour_layout(shapes):
    flat = np.full((37, 51, 3), (12, 200, 99), np.uint8)
    assert np.array_equal(annotate("palette", flat, cells=4), flat)
    coarse = annotate("palette", shapes, cells=4)
    assert len(np.unique(coarse.reshape(-1, 3), axis=0)) <= 16
    assert np.abs(coarse.astype(int).mean((0, 1)) - shapes.astype(int).mean((0, 1))).max() < 2


def test_intensity_and_softedge_of_flat_image():
    flat = np.full((20, 30, 3), 77, np.uint8)
    assert np.all(annotate("intensity", flat) == 77)
    assert not annotate("softedge", flat).any()


@pytest.mark.parametrize("kind", ["box", "brush", "mixed"])
def test_masks_are_seeded(kind, photo):
    a = annotate("mask", photo, kind=kind, seed=5)
    assert np.array_equal(a, annotate("mask", photo, kind=kind, seed=5))
    assert not np.array_equal(a, annotate("mask", photo, kind=kind, seed=6))
    assert 0 < (a > 0).mean() < 1


def test_shuffle_is_seeded_and_keeps_colours(shapes):
    a = annotate("shuffle", shapes, seed=3)
    assert np.array_equal(a, annotate("shuffle", shapes, seed=3))
    assert not np.array_equal(a, annotate("shuffle", shapes, seed=4))
    assert not np.array_equal(a, shapes)
    # content is moved, not invented: every output colour is near some input colour
    src = shapes.reshape(-1, 3).astype(int)
    dist = np.abs(a.reshape(-1, 1, 3).astype(int)[::7] - src[None]).max(-1).min(-1)
    assert np.percentile(dist, 95) < 40


def test_segmentation_separates_colour_regions():
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, 20:] = (250, 250, 250)
    img[5:15, 5:15] = (200, 20, 20)
    seg = annotate("segmentation", img, k=3)
    assert seg[0, 0] == 0 and seg[0, 39] == 2 and seg[10, 10] == 1  # ordered by lightness
    assert np.array_equal(seg, annotate("segmentation", img, k=3))
    assert set(np.unique(annotate("segmentation", img, k=8))) == {0, 1, 2}  # only 3 colours exist


def test_layout_draws_each_phrase_in_its_own_colour(photo):
    out = annotate("layout", photo, boxes=[[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]],
                   phrases=["red circle", "blue star"], text=False)
    colours = {tuple(c) for c in out.reshape(-1, 3)} - {(0, 0, 0)}
    assert len(colours) == 2
    assert out[4, 7:35].any()  # top edge of the first box (y = 0.1 * 44)


def test_depth_of_arbitrary_image_is_refused_but_exact_from_scene(photo):
    with pytest.raises(InputError, match="scene spec"):
        annotate("depth", photo)
    scene = sample_scene("test", 5, n_objects=3)
    ann = annotate_scene(scene, 64, n_captions=1)
    for kind, name in [("depth", "depth"), ("segmentation", "semantic"), ("edges", "edges")]:
        assert np.array_equal(from_scene(kind, scene, 64), ann.maps[name])
    assert np.array_equal(from_scene("canny", scene, 64), annotate("canny", ann.image))
    drawn = from_scene("layout", scene, 64, text=False)
    assert drawn.shape == (64, 64, 3) and drawn.any()


def test_bad_kind_and_parameters_raise_input_error(photo):
    with pytest.raises(InputError, match=r"canny.*xdog"):
        annotate("cany", photo)
    with pytest.raises(InputError, match=r"'low'.*\[0, 1000\]"):
        annotate("canny", photo, low=-1)
    with pytest.raises(InputError, match=r"'low'.*<= 'high'"):
        annotate("canny", photo, low=150, high=100)
    with pytest.raises(InputError, match="unknown parameter 'cels'"):
        annotate("palette", photo, cels=3)
    with pytest.raises(InputError, match=r"'kind'.*box\|brush\|mixed"):
        annotate("mask", photo, kind="circle")
    with pytest.raises(InputError, match="same length"):
        annotate("layout", photo, boxes=[[0, 0, 1, 1]], phrases=[])
    with pytest.raises(InputError, match="'boxes'"):
        annotate("layout", photo, boxes=[[0.5, 0, 0.2, 1]], phrases=["x"])
    with pytest.raises(InputError, match="uint8"):
        annotate("canny", photo.astype(np.float32))
    # grey and RGBA arrays are converted rather than rejected
    assert annotate("intensity", photo[..., 0]).shape == photo.shape[:2]
    assert annotate("canny", np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])).shape == photo.shape[:2]


def test_cli_writes_maps_and_vectors(cli, tmp_path, shapes):
    src = tmp_path / "in.png"
    Image.fromarray(shapes).save(src)
    code, out, _ = cli("annotate", "canny", str(src), "-o", str(tmp_path / "e.png"), "--param", "low=50")
    assert code == 0 and "wrote" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), annotate("canny", shapes, low=50))
    assert cli("annotate", "histogram", str(src), "-o", str(tmp_path / "h.json"))[0] == 0
    assert len(json.loads((tmp_path / "h.json").read_text())) == HISTOGRAM_SIZE
    assert cli("annotate", "histogram", str(src), "-o", str(tmp_path / "h.png"))[0] == 0
    assert cli("annotate", "histogram", str(src), "-o", str(tmp_path / "h.npy"))[0] == 0
    assert np.load(tmp_path / "h.npy").shape == (HISTOGRAM_SIZE,)
    scene = sample_scene("test", 2)
    (tmp_path / "s.json").write_text(json.dumps(scene.to_dict()))
    code, _, _ = cli("annotate", "depth", "--scene", str(tmp_path / "s.json"), "-o", str(tmp_path / "d.png"))
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), from_scene("depth", scene, 64))


def test_cli_converts_rgba_grey_and_16bit(cli, tmp_path, photo):
    images = {
        "rgba.png": Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]), "RGBA"),
        "grey.png": Image.fromarray(photo[..., 1]),
        "deep.png": Image.fromarray(photo[..., 2].astype(np.uint16) * 257),
    }
    for name, img in images.items():
        img.save(tmp_path / name)
        code, _, err = cli("annotate", "softedge", str(tmp_path / name), "-o", str(tmp_path / f"o_{name}"))
        assert code == 0, err
        assert np.asarray(Image.open(tmp_path / f"o_{name}")).shape == photo.shape[:2]


def test_cli_help_lists_kinds_and_parameters(cli):
    code, out, _err = cli("annotate", "--help")
    assert code == 0 and "canny" in out


def test_cli_help_text(capsys, monkeypatch):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("annotate",))
    assert cli_main.main(["annotate", "--help"]) == 0
    text = capsys.readouterr().out
    for a in list_annotators():
        assert a.name in text
    assert "low: int in [0, 1000], default 100" in text
    assert "kind: one of box|brush|mixed, default mixed" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["annotate", "cany", "{img}", "-o", "{out}"], "unknown annotator kind 'cany'"),
        (["annotate", "canny", "{dir}/missing.png", "-o", "{out}"], "does not exist"),
        (["annotate", "canny", "{dir}/junk.png", "-o", "{out}"], "not a readable image"),
        (["annotate", "canny", "{img}", "-o", "{out}", "--param", "low=2000"], "'low' must be int in [0, 1000]"),
        (["annotate", "canny", "{img}", "-o", "{out}", "--param", "lo=20"], "unknown parameter 'lo'"),
        (["annotate", "canny", "{img}", "-o", "{out}", "--param", "low"], "NAME=VALUE"),
        (["annotate", "canny", "{img}", "-o", "{dir}/out.jpg"], "must end with .png or .npy"),
        (["annotate", "depth", "{img}", "-o", "{out}"], "scene spec"),
        (["annotate", "depth", "--scene", "{dir}/junk.png", "-o", "{out}"], "not valid JSON"),
        (["annotate", "canny", "-o", "{out}"], "needs an IMAGE"),
    ],
)
def test_cli_bad_input_exits_2_without_output(cli, tmp_path, shapes, argv, message):
    Image.fromarray(shapes).save(tmp_path / "in.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    subs = {"{img}": str(tmp_path / "in.png"), "{out}": str(tmp_path / "out.png"), "{dir}": str(tmp_path)}
    args = [a for a in argv]
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    before = set(tmp_path.iterdir())
    code, _, err = cli(*args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # no output, no temp file left behind
