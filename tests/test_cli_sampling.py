"""The CLI's sampling options: one declaration and one default per option, and each control built once per request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from mmsynth.cli.main import build_parser, main
from mmsynth.cli.sampling_options import add_sampling_arguments, sampling_kwargs
from mmsynth.sample import request as R


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def images(bundle, tmp_path):
    """An init image and a binary mask of the bundle's size, as PNG files."""
    r = bundle.resolution
    init = (np.random.default_rng(0).random((r, r, 3)) * 255).astype(np.uint8)
    mask = np.zeros((r, r), np.uint8)
    mask[r // 4: 3 * r // 4, r // 4: 3 * r // 4] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def _parse(argv: list[str]) -> dict:
    return sampling_kwargs(build_parser().parse_args(argv))


def test_every_command_takes_its_sampling_defaults_from_the_request_module():
    gen = _parse(["generate", "--out", "o"])
    assert (gen["cfg"], gen["steps"], gen["scheduler"], gen["seed"], gen["eta"], gen["best_of"]) == (
        R.DEFAULT_CFG, R.DEFAULT_STEPS, R.DEFAULT_SCHEDULER, R.DEFAULT_SEED, R.DEFAULT_ETA, R.DEFAULT_BEST_OF)
    assert (gen["prompt"], gen["negative_prompt"], gen["height"], gen["width"]) == ("", "", None, None)
    edit = _parse(["edit", "x.png", "--source-prompt", "a", "--prompt", "b", "--out", "o"])
    assert edit == {"prompt": "b", "steps": R.DEFAULT_INVERSION_STEPS, "cfg": R.DEFAULT_CFG, "seed": R.DEFAULT_SEED,
                    "scheduler": R.DEFAULT_SCHEDULER}
    inv = _parse(["invert", "x.png", "--prompt", "a", "--out", "x.safetensors"])
    assert (inv["steps"], inv["cfg"], inv["negative_prompt"]) == (R.DEFAULT_INVERSION_STEPS, R.DEFAULT_INVERSION_CFG,
                                                                   "")
    assert _parse(["demo"]) == {"steps": R.DEFAULT_STEPS, "cfg": R.DEFAULT_CFG}
    assert _parse(["bench", "run", "--quick"]) == {"steps": R.DEFAULT_STEPS, "cfg": R.DEFAULT_CFG,
                                                   "scheduler": R.DEFAULT_SCHEDULER}
    from mmsynth.evaluate.bench.generation import SamplerSettings

    s = SamplerSettings()
    assert (s.cfg, s.steps, s.scheduler, s.eta, s.best_of) == (R.DEFAULT_CFG, R.DEFAULT_STEPS, R.DEFAULT_SCHEDULER,
                                                                R.DEFAULT_ETA, R.DEFAULT_BEST_OF)
    given = _parse(["generate", "--out", "o", "--cfg", "2.5", "--steps", "3", "-n", "2"])
    assert (given["cfg"], given["steps"], given["n"]) == (2.5, 3, 2)


def test_help_names_each_commands_own_default(capsys):
    for argv, text in ((["generate"], "classifier-free guidance scale (default 5; 1 = off)"),
                       (["edit"], "DDIM steps of inversion and generation (default 50)"),
                       (["invert"], "guidance scale of the inversion (default 1: plain DDIM)")):
        assert main([*argv, "--help"]) == 0
        assert text in " ".join(capsys.readouterr().out.split())


def test_unknown_sampling_option_is_a_programming_error():
    import argparse

    with pytest.raises(ValueError, match="not sampling options"):
        add_sampling_arguments(argparse.ArgumentParser(), ("cfg", "guidance"))


@pytest.fixture
def counts(monkeypatch):
    """How often each control is built (__post_init__) and recorded (to_dict), and how often PIL opens an image."""
    from mmsynth.sample.img2img import Img2Img
    from mmsynth.sample.inpaint import BlendedInpaint
    from mmsynth.sample.universal import UniversalGuidance

    seen: dict[str, int] = {}

    def counting(owner, attr, key):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            seen[key] = seen.get(key, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)

    for cls in (Img2Img, BlendedInpaint, UniversalGuidance):
        counting(cls, "__post_init__", f"build {cls.name}")
        counting(cls, "to_dict", f"record {cls.name}")
    counting(PIL.Image, "open", "open")
    return seen


@pytest.mark.parametrize("extra,expected,embedded", [
    (["--init-image", "INIT", "--strength", "0.6"], {"build img2img": 1, "record img2img": 1, "open": 1}, 1),
    (["--init-image", "INIT", "--mask", "MASK"], {"build inpaint": 1, "record inpaint": 1, "open": 2}, 2),
    (["--init-image", "INIT", "--mask", "MASK", "--strength", "0.8"],
     {"build img2img": 1, "record img2img": 1, "build inpaint": 1, "record inpaint": 1, "open": 2}, 3),
    (["--guide", "palette", "--guide-target", "INIT"],
     {"build universal-guidance": 1, "record universal-guidance": 1, "open": 1}, 1),
])
def test_generate_builds_each_control_once_and_decodes_each_image_once(model_dir, images, tmp_path, counts, extra,
                                                                       expected, embedded):
    """Before: 4 builds and 3 PNG decodes of the img2img control per `generate --init-image` (object -> dict ->
    object round trips in build_request, validate and the sampler); now one build from the loaded file and the
    sampler's one to_dict, which records it. A replay decodes each PNG embedded in the file once."""
    paths = {"INIT": str(images[0]), "MASK": str(images[1])}
    argv = ["generate", "--prompt", "a red circle", "--steps", "2", "-n", "2", "--model", str(model_dir), "--quiet",
            "--out", str(tmp_path / "out"), *[paths.get(a, a) for a in extra]]
    assert main(argv) == 0
    assert counts == expected
    batch = json.loads((tmp_path / "out" / "request.json").read_text())
    image0 = json.loads((tmp_path / "out" / "requests" / "0000.json").read_text())
    assert batch["controls"] == image0["controls"] and batch["n"] == 2 and len(batch["controls"]) == len(expected) // 2

    counts.clear()
    again = tmp_path / "again"
    assert main(["generate", "--replay", str(tmp_path / "out" / "request.json"), "--out", str(again), "--quiet"]) == 0
    assert counts == {**expected, "open": embedded}
    for name in ("0000.png", "0001.png"):
        a, b = (np.asarray(Image.open(d / "images" / name)) for d in (tmp_path / "out", again))
        assert np.array_equal(a, b)
    assert json.loads((again / "request.json").read_text()) == batch


REPLAY = Path(__file__).parent / "data" / "replay"
REPLAYED = ("img2img", "inpaint_base", "palette_guide", "attend_excite", "layout_attention", "edit_attention")


@pytest.mark.parametrize("name", REPLAYED)
def test_generate_replays_requests_recorded_before_the_change_pixel_exactly(model_dir, tmp_path, name):
    """The CLI's replay (controls built once from the file, recorded by the sampler) gives the pixels that the
    library gave when tests/data/replay was recorded, before controls stopped going object -> dict -> object."""
    from test_replay_pixels import _platform

    out = tmp_path / "out"
    assert main(["generate", "--replay", str(REPLAY / f"tiny__{name}.json"), "--model", str(model_dir), "--out",
                 str(out), "--quiet"]) == 0
    with np.load(REPLAY / "pixels.npz") as recorded:
        expected = recorded[f"tiny__{name}"]
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))])
    diff = np.abs(images.astype(int) - expected.astype(int)).max()
    same_platform = (REPLAY / "platform.txt").read_text(encoding="utf-8").strip() == _platform()
    assert diff == 0 if same_platform else diff <= 1
    written = json.loads((out / "request.json").read_text())
    side = images.shape[1]  # the request now records what was drawn: real size, the model's hash, its LoRAs (none)
    assert written == {**json.loads((REPLAY / f"tiny__{name}.json").read_text()), "model": str(model_dir),
                       "height": side, "width": side, "model_hash": written["model_hash"], "loras": [],
                       "dtype": "fp32"}  # (recorded before requests knew their dtype: replayed in fp32)
    assert isinstance(written["model_hash"], str) and len(written["model_hash"]) == 10
