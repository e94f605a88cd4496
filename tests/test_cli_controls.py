"""`--control SPEC` on the command line: parsing (pure), resolving a NAME against a bundle's manifest, the help, and
`mmsynth generate` / `mmsynth edit` end to end with a ControlNet and a T2I-Adapter (recorded, replayed exactly)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmsynth.cli import control_options as C
from mmsynth.cli.main import main
from mmsynth.errors import InputError

CLASSES = {"controlnet_canny": "ControlNetModel", "adapter_depth": "T2IAdapter",
           "unet_inpainting": "UNet2DConditionModel"}


# ---------------------------------------------------------------------------------------------- parsing (pure)
def test_a_spec_reads_every_key():
    s = C.parse_spec("canny=e.png,weight=0.5/1/2,start=0.1,end=0.8,mode=prompt,guess=true,mask=m.png,annotate=canny,"
                     "annotate.low=50,model=cn")
    assert (s.name, s.image, s.weight, s.start, s.end, s.mode, s.guess, s.mask, s.model) == (
        "canny", "e.png", [0.5, 1.0, 2.0], 0.1, 0.8, "prompt", True, "m.png", "cn")
    assert (s.annotate, s.annotate_params) == ("canny", {"low": 50})  # typed by the annotator's own parameter
    plain = C.parse_spec("depth=d.png")
    assert (plain.weight, plain.start, plain.end, plain.mode, plain.guess, plain.mask, plain.annotate_params) == (
        None, None, None, None, None, None, {})
    assert C.parse_spec("x=a.png,weight=0.7").weight == 0.7


@pytest.mark.parametrize("text,says", [
    ("canny", "must look like NAME=IMAGE"),
    ("canny=", "must look like NAME=IMAGE"),
    ("=e.png", "must look like NAME=IMAGE"),
    ("canny=e.png,weight", "must look like key=value"),
    ("canny=e.png,strength=1", "unknown key 'strength'; valid: weight, start, end, mode, guess, mask, annotate"),
    ("canny=e.png,weight=1,weight=2", "weight is given twice"),
    ("canny=e.png,weight=abc", "weight must be a number, got 'abc'"),
    ("canny=e.png,weight=nan", "weight must be a finite number"),
    ("canny=e.png,weight=-0.5", "weight must be >= 0"),
    ("canny=e.png,weight=1/-1", "weight must be >= 0"),
    ("canny=e.png,start=1.5", "start must be a fraction of the steps in [0, 1]"),
    ("canny=e.png,start=0.6,end=0.4", "start must be below end"),
    ("canny=e.png,end=0", "start must be below end"),
    ("canny=e.png,mode=loud", "unknown mode 'loud'; valid: balanced, prompt, control"),
    ("canny=e.png,guess=maybe", "guess must be true or false"),
    ("canny=e.png,annotate.low=5", "annotate.low needs annotate=NAME"),
    ("canny=e.png,annotate=cany", "unknown annotator kind 'cany'"),
    ("canny=e.png,annotate=canny,annotate.lo=5", "unknown parameter 'lo'"),
    ("canny=e.png,annotate=canny,annotate.low=nan", "parameter 'low'"),
])
def test_a_bad_spec_is_refused_naming_it_and_what_is_valid(text, says):
    with pytest.raises(InputError) as err:
        C.parse_spec(text)
    assert str(err.value).startswith(f"--control '{text}'") and says in str(err.value)


def test_the_cli_names_what_the_controls_define():
    from diffusers import ControlNetModel, T2IAdapter

    from mmsynth.sample.controlnet import MODES
    from mmsynth.sample.controls import control_names

    assert C.MODES == MODES
    assert set(C.KIND_CLASSES) <= set(control_names())
    assert {ControlNetModel.__name__, T2IAdapter.__name__} == set(C.KINDS)
    assert all(t.startswith(C.KIND_PREFIXES["controlnet"]) or t.startswith(C.KIND_PREFIXES["t2i-adapter"])
               for t in C.ALIASES.values())


# ---------------------------------------------------------------------------------------------- resolving a NAME
@pytest.mark.parametrize("text,expected", [
    ("controlnet_canny=e.png", ("controlnet", "controlnet_canny")),
    ("adapter_depth=e.png", ("t2i-adapter", "adapter_depth")),
    ("canny=e.png", ("controlnet", "controlnet_canny")),
    ("depth=e.png,weight=0.5", ("t2i-adapter", "adapter_depth")),
    ("controlnet=e.png,model=controlnet_canny", ("controlnet", "controlnet_canny")),
])
def test_a_name_resolves_to_its_control_and_network(text, expected):
    assert C.resolve(C.parse_spec(text), "m", CLASSES) == expected


@pytest.mark.parametrize("text,says", [
    ("cany=e.png", "unknown control 'cany'; valid: this model's control components (controlnet_canny, "
                   "adapter_depth), the aliases of shipped components canny, segmentation, seg"),
    ("seg=e.png", "is the shipped component controlnet_segmentation, which model 'm' does not carry"),
    ("unet_inpainting=e.png", "component 'unet_inpainting' is a UNet2DConditionModel, not a control"),
    ("controlnet=e.png", "'controlnet' needs model=DIR"),
    ("t2i-adapter=e.png,model=controlnet_canny", "model 'controlnet_canny' is a ControlNetModel, not a T2IAdapter"),
    ("depth=e.png,mode=prompt", "mode is a ControlNet option and 'depth' is a T2I-Adapter; its keys: weight, start"),
    ("adapter_depth=e.png,guess=true", "guess is a ControlNet option"),
    ("canny=e.png,model=/no/such/dir", "model '/no/such/dir' is neither a component of model 'm' nor a directory"),
])
def test_a_name_that_does_not_resolve_is_refused(text, says):
    with pytest.raises(InputError, match=None) as err:
        C.resolve(C.parse_spec(text), "m", CLASSES)
    assert says in str(err.value), str(err.value)


def test_a_model_without_controls_says_so(tmp_path):
    with pytest.raises(InputError, match=f"control components \\(none: {tmp_path} carries no ControlNet or "
                                         "T2I-Adapter\\)"):
        C.resolve(C.parse_spec("foo=e.png"), str(tmp_path), {})
    with pytest.raises(InputError, match="control components \\(none: 'no/such' is not a model directory here\\)"):
        C.resolve(C.parse_spec("foo=e.png"), "no/such", {})


def test_a_directory_of_the_other_kind_is_refused_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "T2IAdapter"}))
    with pytest.raises(InputError, match="is a T2IAdapter, not a ControlNetModel"):
        C.resolve(C.parse_spec(f"controlnet=e.png,model={tmp_path}"), "m", {})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(InputError, match="is a AutoencoderKL, not a ControlNetModel or a T2IAdapter"):
        C.resolve(C.parse_spec(f"canny=e.png,model={tmp_path}"), "m", {})


# ---------------------------------------------------------------------------------------------- help
def test_help_lists_the_syntax_and_the_default_models_controls_without_importing_torch():
    code = ("import sys\nfrom mmsynth.cli.main import main\ntry:\n    main(['generate', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "--control SPEC" in text and "NAME=IMAGE[,key=value...]" in text
    for key in ("weight=W", "start=F, end=F", "mode=M", "guess=true", "mask=PNG", "annotate=A", "annotate.PARAM=V",
                "model=M", "canny (controlnet_canny)", "depth (adapter_depth)"):
        assert key in text, key
    assert "the default model (models/shapes-v1) carries" in text


def test_help_names_the_controls_a_model_carries(control_model_dir):
    text = C.help_text(str(control_model_dir))
    assert "carries: adapter_depth (t2i-adapter), controlnet_canny (controlnet)" in " ".join(text.split())
    assert "aliases: canny = controlnet_canny, depth = adapter_depth" in " ".join(text.split())
    assert C.control_components(control_model_dir) == {"controlnet_canny": "controlnet", "adapter_depth": "t2i-adapter"}


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Condition images at the tiny size (32) and twice it, a region mask and an init image."""
    d = tmp_path_factory.mktemp("files")
    r = 32
    edges = np.zeros((r, r, 3), np.uint8)
    edges[4:16, 6:20] = 255
    depth = np.tile(np.linspace(0, 255, r, dtype=np.uint8)[:, None, None], (1, r, 3))
    mask = np.zeros((r, r), np.uint8)
    mask[:, : r // 2] = 255
    init = (np.random.default_rng(0).random((r, r, 3)) * 255).astype(np.uint8)
    for name, arr in (("edges", edges), ("depth", depth), ("mask", mask), ("init", init),
                      ("big", np.asarray(Image.fromarray(edges).resize((2 * r, 2 * r))))):
        Image.fromarray(arr).save(d / f"{name}.png")
    return {name: str(d / f"{name}.png") for name in ("edges", "depth", "mask", "init", "big")}


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


def test_generate_with_a_controlnet_and_an_adapter_records_them_and_replays_exactly(control_model_dir, files,
                                                                                   tmp_path, capsys):
    base = ["generate", "--model", str(control_model_dir), "--prompt", "a red circle", "--steps", "2", "-n", "2",
            "--quiet", "--init-image", files["init"], "--mask", files["mask"]]
    controls = ["--control", f"canny={files['edges']},weight=0.8,end=0.8,mode=prompt",
                "--control", f"depth={files['depth']},weight=0.5/1/1,mask={files['mask']}"]
    _run([*base, *controls, "--out", str(tmp_path / "a")], capsys)
    request = json.loads((tmp_path / "a" / "request.json").read_text())
    by_name = {c["name"]: c for c in request["controls"]}
    assert list(by_name) == ["inpaint", "controlnet", "t2i-adapter"]  # one request: inpainting composes with both
    cn, ad = by_name["controlnet"], by_name["t2i-adapter"]
    assert (cn["model"], cn["mode"], cn["schedule"]["scale"], cn["schedule"]["end"]) == (
        "controlnet_canny", "prompt", 0.8, 0.8)
    assert (ad["model"], ad["schedule"]["scale"]) == ("adapter_depth", [0.5, 1.0, 1.0])
    assert cn["image"].startswith("data:image/png") and ad["schedule"]["mask"].startswith("data:image/png")

    _run(["generate", "--replay", str(tmp_path / "a" / "request.json"), "--quiet", "--out", str(tmp_path / "b")],
         capsys)
    for i in range(2):
        assert (tmp_path / "a" / "images" / f"{i:04d}.png").read_bytes() == (
            tmp_path / "b" / "images" / f"{i:04d}.png").read_bytes()
    _run(["generate", "--replay", str(tmp_path / "a" / "requests" / "0001.json"), "--quiet", "--out",
          str(tmp_path / "c")], capsys)  # one image's own request: as alone (a batch of 1 rounds differently)
    one = np.asarray(Image.open(tmp_path / "c" / "images" / "0000.png"), np.int16)
    assert np.abs(one - np.asarray(Image.open(tmp_path / "a" / "images" / "0001.png"), np.int16)).max() <= 1

    _run([*base, "--out", str(tmp_path / "plain")], capsys)  # the controls change the image
    plain = np.asarray(Image.open(tmp_path / "plain" / "images" / "0000.png"), np.int16)
    assert np.abs(plain - np.asarray(Image.open(tmp_path / "a" / "images" / "0000.png"), np.int16)).max() > 0


def test_a_control_image_of_another_size_is_resized_with_a_warning_the_user_sees(control_model_dir, files,
                                                                                 tmp_path, capsys):
    err = _run(["generate", "--model", str(control_model_dir), "--steps", "1", "-n", "1", "--quiet", "--control",
                f"canny={files['big']}", "--out", str(tmp_path / "o")], capsys)
    assert "mmsynth generate: warning: controlnet image is 64x64; resized to the output's 32x32" in err


def test_edit_takes_controls_on_its_sampling(control_model_dir, files, tmp_path, capsys):
    _run(["edit", files["init"], "--source-prompt", "a red circle", "--prompt", "a blue circle", "--steps", "2",
          "--model", str(control_model_dir), "--quiet", "--control", f"controlnet_canny={files['edges']},guess=true",
          "--out", str(tmp_path / "e")], capsys)
    controls = json.loads((tmp_path / "e" / "request.json").read_text())["controls"]
    cn = next(c for c in controls if c["name"] == "controlnet")
    assert (cn["guess_mode"], cn["schedule"]["branch"]) == (True, "cond")
