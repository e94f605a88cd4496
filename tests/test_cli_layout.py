"""`mmsynth generate` with a layout: from a file, from --box flags or planned from the prompt (--plan), drawn by each
layout method, written beside the images, replayed from the request; bad layout input exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmsynth.cli import layout_options
from mmsynth.cli.main import main
from mmsynth.sample.layout import LAYOUT_METHODS

PROMPT = "two red circles left of a blue square"
FAST = ["--steps", "2", "-n", "1", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def test_the_cli_methods_are_the_sample_layers():
    assert set(layout_options.METHODS) == set(LAYOUT_METHODS)


def test_a_planned_layout_is_drawn_written_and_replays(model_dir, tmp_path):
    out = tmp_path / "planned"
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--plan", "shapes",
                 "--layout-method", "backward", "--out", str(out), *FAST]) == 0
    layout = json.loads((out / "layout.json").read_text())
    assert layout["prompt"] == PROMPT and [o["phrase"] for o in layout["objects"]] == ["red circle"] * 2 + [
        "blue square"]
    assert np.asarray(Image.open(out / "layout.png")).any()
    (control,) = json.loads((out / "request.json").read_text())["controls"]
    assert control["name"] == "layout-guidance" and control["boxes"] == [o["box"] for o in layout["objects"]]
    again = tmp_path / "again"
    assert main(["generate", "--replay", str(out / "request.json"), "--model", str(model_dir), "--out", str(again),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "images" / "0000.png")),
                          np.asarray(Image.open(again / "images" / "0000.png")))


@pytest.mark.parametrize("method,control", [("forward", "layout-attention"), ("regional", "regional-prompt")])
def test_boxes_from_flags_with_each_training_free_method(model_dir, tmp_path, method, control):
    out = tmp_path / method
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--box", "0.05,0.3,0.35,0.6=red circle",
                 "--box", "0.6,0.3,0.95,0.7=blue square", "--layout-method", method, "--out", str(out), *FAST]) == 0
    assert json.loads((out / "request.json").read_text())["controls"][0]["name"] == control


def test_a_layout_file_gives_its_prompt_when_there_is_none(model_dir, tmp_path):
    f = tmp_path / "layout.json"
    f.write_text(json.dumps({"prompt": PROMPT, "objects": [{"box": [0.1, 0.2, 0.4, 0.5], "phrase": "red circle"}]}))
    out = tmp_path / "o"
    assert main(["generate", "--model", str(model_dir), "--layout", str(f), "--layout-method", "forward",
                 "--out", str(out), *FAST]) == 0
    assert json.loads((out / "request.json").read_text())["prompt"] == PROMPT


@pytest.mark.parametrize("extra,message", [
    (["--plan", "shapes", "--box", "0.1,0.1,0.5,0.5=red circle"], "one way"),
    (["--layout-method", "forward"], "needs a layout"),
    (["--box", "0.1,0.1,0.5=red circle"], "X0,Y0,X1,Y1=PHRASE"),
    (["--box", "0.5,0.1,0.2,0.5=red circle"], "x0 < x1"),
    (["--plan", "shapes"], "layout-guidance"),  # gligen, the default method, on a model without its layers
    (["--plan", "bogus"], "shapes"),
    (["--box", "0.1,0.1,0.5,0.5=green star", "--layout-method", "backward"], "green star"),
    (["--layout", "missing.json"], "does not exist"),
])
def test_bad_layout_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, *extra, "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]  # (the libraries' loading bars aside)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not out.exists()
