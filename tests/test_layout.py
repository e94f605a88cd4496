"""Layouts: validation of boxes, phrases and files, phrase positions in a prompt, and `mmsynth layout draw|plan`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmsynth.cli.main as cli_main
from mmsynth.errors import InputError
from mmsynth.sample.layout import MAX_BOXES, Layout, LayoutObject, missing_phrases, phrase_token_positions

ZOO_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "shapes-v1" / "tokenizer"
GOOD = {"prompt": "a red circle left of a blue square",
        "objects": [{"box": [0.1, 0.3, 0.4, 0.6], "phrase": "red circle"},
                    {"box": [0.6, 0.3, 0.9, 0.6], "phrase": "blue square"}]}  # fmt: skip


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `mmsynth ...` through the real entry point with only the layout command registered."""
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("layout",))

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli_main.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("boxes", "phrases", "message"),
    [
        ([[0.1, 0.2, 1.2, 0.5]], ["red circle"], "0 <= x0 < x1 <= 1"),
        ([[-0.1, 0.2, 0.5, 0.5]], ["red circle"], "0 <= x0 < x1 <= 1"),
        ([[0.5, 0.2, 0.5, 0.6]], ["red circle"], "0 <= x0 < x1 <= 1"),
        ([[0.6, 0.2, 0.3, 0.6]], ["red circle"], "0 <= x0 < x1 <= 1"),
        ([[0.1, 0.6, 0.3, 0.2]], ["red circle"], "y0 < y1"),
        ([[0.1, 0.2, 0.3]], ["red circle"], "four numbers"),
        ([[0.1, 0.2, 0.3, float("nan")]], ["red circle"], "four numbers"),
        ([[0.1, 0.2, 0.3, True]], ["red circle"], "four numbers"),
        ([[0.1, 0.2, 0.3, 0.4]], [" "], "non-empty string"),
        ([[0.1, 0.2, 0.3, 0.4]], [""], "non-empty string"),
        ([[0.1, 0.2, 0.3, 0.4]], [3], "non-empty string"),
        ([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]], ["red circle"], "2 boxes but 1 phrases"),
        ([[0.1, 0.2, 0.3, 0.4]], "red circle", "phrases must be a list"),
        ([], [], "at least one box"),
        ([[0.1, 0.2, 0.3, 0.4]] * (MAX_BOXES + 1), ["x"] * (MAX_BOXES + 1), f"31 boxes; at most {MAX_BOXES}"),
    ],
)
def test_bad_boxes_and_phrases_are_refused_naming_what_is_valid(boxes, phrases, message):
    with pytest.raises(InputError, match=r"^layout") as info:
        Layout.from_lists(boxes, phrases)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_thirty_boxes_are_allowed_and_the_dataclass_validates_too():
    assert len(Layout.from_lists([[0.1, 0.2, 0.3, 0.4]] * MAX_BOXES, ["x"] * MAX_BOXES).objects) == MAX_BOXES
    with pytest.raises(InputError, match="x0 < x1"):
        Layout([LayoutObject((0.5, 0.1, 0.2, 0.4), "red circle")])
    with pytest.raises(InputError, match="prompt must be a string"):
        Layout([LayoutObject((0.1, 0.1, 0.2, 0.4), "red circle")], prompt=3)  # type: ignore[arg-type]


def test_round_trip_and_bare_list(tmp_path):
    layout = Layout.from_dict(GOOD)
    assert layout.phrases == ["red circle", "blue square"] and layout.boxes[1] == [0.6, 0.3, 0.9, 0.6]
    assert Layout.from_dict(layout.to_dict()) == layout
    (tmp_path / "l.json").write_text(json.dumps(layout.to_dict()))
    assert Layout.load(tmp_path / "l.json") == layout
    bare = Layout.from_dict(GOOD["objects"])
    assert bare.prompt == "" and bare.objects == layout.objects
    assert Layout.from_lists([(0, 0, 1, 1)], [" red circle "]).phrases == ["red circle"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not readable JSON"),
        (json.dumps({**GOOD, "boxes": []}), "unknown field(s) ['boxes']; valid: prompt, objects"),
        (json.dumps({"prompt": "x"}), '"objects"'),
        (json.dumps({"objects": [{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "red circle", "z": 1}]}), "object 0 must be"),
        (json.dumps({"objects": [{"box": [0.1, 0.1, 0.5, 1.5], "phrase": "red circle"}]}), "box 0"),
        (json.dumps(3), "must be"),
    ],
)
def test_bad_layout_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        Layout.load(path)
    assert f"layout file '{path}'" in str(info.value) and message in str(info.value)


def test_missing_layout_file():
    with pytest.raises(InputError, match="does not exist"):
        Layout.load("/nonexistent/layout.json")


# ------------------------------------------------------------------------------------------ phrases in the prompt


@pytest.fixture(scope="module")
def zoo_tokenizer():
    if not ZOO_TOKENIZER.exists():
        pytest.skip("the shipped zoo's tokenizer is missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ZOO_TOKENIZER)


def test_phrase_positions_find_singular_phrases_in_plural_prompts(zoo_tokenizer):
    prompt = "two red circles left of a blue square"
    # BOS two red circles left of a blue square EOS
    assert phrase_token_positions(zoo_tokenizer, prompt, "red circle", "layout") == [2, 3]
    assert phrase_token_positions(zoo_tokenizer, prompt, "blue square", "layout") == [7, 8]
    assert phrase_token_positions(zoo_tokenizer, prompt, "square", "layout") == [8]
    with pytest.raises(InputError, match="phrase 'green star' is not in the prompt 'two red circles"):
        phrase_token_positions(zoo_tokenizer, prompt, "green star", "layout")
    layout = Layout.from_lists([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], ["red circle", "green star"])
    assert missing_phrases(zoo_tokenizer, layout, prompt) == ["green star"]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_plan_writes_a_loadable_layout_and_its_drawing(cli, tmp_path):
    out, png = tmp_path / "sub" / "layout.json", tmp_path / "layout.png"
    prompt = "two red circles left of a blue square"
    code, stdout, err = cli("layout", "plan", "--prompt", prompt, "--seed", "3", "-o", str(out), "--draw", str(png))
    assert code == 0, err
    assert "3 boxes" in stdout and str(out) in stdout
    layout = Layout.load(out)
    assert layout.prompt == prompt and layout.phrases == ["red circle", "red circle", "blue square"]
    drawing = np.asarray(Image.open(png))
    assert drawing.shape == (256, 256, 3) and drawing.any()
    # the same seed plans the same layout; --overwrite replaces it
    code, _, _ = cli("layout", "plan", "--prompt", prompt, "--seed", "3", "-o", str(out), "--overwrite")
    assert code == 0 and Layout.load(out) == layout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["layout.json", "layout.png", "sub"]  # no temp files


def test_cli_draw_on_black_and_over_an_image(cli, tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(GOOD))
    code, stdout, err = cli("layout", "draw", str(tmp_path / "l.json"), "-o", str(tmp_path / "a.png"), "--size", "64")
    assert code == 0 and "2 boxes, 64x64" in stdout, err
    blank = np.asarray(Image.open(tmp_path / "a.png"))
    assert blank.shape == (64, 64, 3)
    assert len({tuple(c) for c in blank.reshape(-1, 3)} - {(0, 0, 0)}) >= 2  # one colour per phrase (and text)
    Image.fromarray(np.full((40, 70, 3), 200, np.uint8)).save(tmp_path / "img.png")
    code, _, err = cli("layout", "draw", str(tmp_path / "l.json"), "-o", str(tmp_path / "b.png"),
                       "--image", str(tmp_path / "img.png"))  # fmt: skip
    assert code == 0, err
    over = np.asarray(Image.open(tmp_path / "b.png"))
    assert over.shape == (40, 70, 3) and (over == 200).all(axis=-1).any() and not (over == 200).all()


def test_cli_help_explains_the_format_and_the_planners(cli):
    code, out, _ = cli("layout", "plan", "--help")
    assert code == 0 and "llm:PATH" in out and "shapes" in out and "--seed" in out
    code, out, _ = cli("layout", "draw", "--help")
    assert code == 0 and '"phrase": "red circle"' in out and "--image" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["draw", "{dir}/missing.json", "-o", "{out}"], "does not exist"),
        (["draw", "{dir}/junk.json", "-o", "{out}"], "not readable JSON"),
        (["draw", "{dir}/wide.json", "-o", "{out}"], "0 <= x0 < x1 <= 1"),
        (["draw", "{dir}/good.json", "-o", "{dir}/out.jpg"], "must end with .png"),
        (["draw", "{dir}/good.json", "-o", "{dir}/existing.png"], "already exists"),
        (["draw", "{dir}/good.json", "-o", "{out}", "--size", "5"], "--size"),
        (["draw", "{dir}/good.json", "-o", "{out}", "--size", "64", "--image", "{dir}/img.png"], "--size is for"),
        (["draw", "{dir}/good.json", "-o", "{out}", "--image", "{dir}/junk.json"], "not a readable image"),
        (["draw", "{dir}/good.json", "-o", "{dir}/good.json"], "must end with .png"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.png"], "must end with .json"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.json", "--planner", "gpt"], "planner 'gpt' is not one"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.json", "--planner", "llm:{dir}/nope"], "does not exist"),
        (["plan", "--prompt", "a red dog", "-o", "{dir}/l.json", "--draw", "{out}"], "expected a shape"),
        (["plan", "--prompt", "", "-o", "{dir}/l.json"], "non-empty"),
        (["plan", "--prompt", "a red circle left of the red circle", "-o", "{dir}/l.json"], "itself"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.json", "--seed", "-1"], "--seed"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.json", "--size", "64"], "give --draw"),
        (["plan", "--prompt", "a red circle", "-o", "{dir}/l.json", "--draw", "{dir}/existing.png"], "already exists"),
        (["plan", "--prompt", "a red circle left of a blue square, with the blue square left of the red circle",
          "-o", "{dir}/l.json", "--draw", "{out}"], "could not place"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_output(cli, tmp_path, argv, message):
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "good.json").write_text(json.dumps(GOOD))
    (tmp_path / "wide.json").write_text(json.dumps([{"box": [0.2, 0.1, 1.5, 0.5], "phrase": "red circle"}]))
    (tmp_path / "existing.png").write_bytes(b"keep")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    subs = {"{out}": str(tmp_path / "out.png"), "{dir}": str(tmp_path)}
    args = ["layout", *argv]
    for k, v in subs.items():
        args = [a.replace(k, v) for a in args]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, err = cli(*args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing replaced
