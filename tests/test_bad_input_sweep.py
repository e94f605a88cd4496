"""Bad input never costs a user data or a traceback: a sweep over every command and class of bad input.

Each row runs one command line in-process and expects: exit 2, one `error:` line and no traceback, and the output
location exactly as it was (same files, bytes and modes; no temp files or new folders beside it). A new command adds
its rows here. The rows are cheap: every one is refused before a model runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsynth.cli.main import main

ROOT_WRITES_ANYWHERE = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Inputs:
    """Valid inputs every row can use, so that the one bad input is what a row tests."""

    model: str
    image: str
    mask: str
    scene: str
    cases: str
    nan_latents: str
    big_replay: str
    real: str
    tall: str  # 8 x 2100 pixels: taller than the default --max-side
    deep: str  # JSON nested deeper than the parser's recursion limit
    latin1: str  # a request that is not UTF-8
    typo_scene: str  # a scene spec with a misspelt field
    future_scene: str  # a scene spec of a version this release does not know
    controls: str  # a model carrying controlnet_canny and adapter_depth
    other_cn: str  # a ControlNet directory built for another base (another UNet's widths)
    grey_mask: str  # a mask of the image's size that is not binary
    small_mask: str  # a binary mask half the image's size
    layout: str  # a one-box layout file


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, control_model_dir) -> Inputs:
    from mmsynth.data import render, sample_scene
    from mmsynth.models.zoo import tiny_bundle

    d = tmp_path_factory.mktemp("inputs")
    bundle = tiny_bundle(0)
    bundle.save_pretrained(d / "model")
    r = bundle.resolution
    Image.fromarray(render(sample_scene("test", 1), r)).save(d / "image.png")
    mask = np.zeros((r, r), np.uint8)
    mask[: r // 2] = 255
    Image.fromarray(mask).save(d / "mask.png")
    (d / "scene.json").write_text(json.dumps(sample_scene("test", 2).to_dict()))
    assert main(["bench", "make-cases", "--suite", "t2i", "--n", "1", "--out", str(d / "cases.jsonl")]) == 0
    from safetensors.torch import save_file

    f = bundle.vae_scale_factor
    save_file({"latents": torch.full((1, 4, r // f, r // f), float("nan"))}, str(d / "nan.safetensors"))
    (d / "big.json").write_text(json.dumps({"prompt": "a red circle", "height": 100000, "width": 64}))
    (d / "real").mkdir()
    Image.fromarray(render(sample_scene("test", 3), r)).save(d / "real" / "a.png")
    Image.fromarray(np.zeros((2100, 8, 3), np.uint8)).save(d / "tall.png")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "latin1.json").write_bytes('{"prompt": "a red circle caf\u00e9"}'.encode("latin-1"))
    spec = sample_scene("test", 2).to_dict()
    spec["backgroud"] = spec.pop("background")
    (d / "typo.json").write_text(json.dumps(spec))
    (d / "future.json").write_text(json.dumps({**sample_scene("test", 2).to_dict(), "version": 99}))
    from mmsynth.models.zoo import TINY, build_controlnet, build_unet

    other = dataclasses.replace(TINY, unet_channels=(16, 32, 64), unet_cross_attention_levels=(True, True, True))
    build_controlnet(build_unet(other, cross_attention_dim=TINY.text_width), f).save_pretrained(d / "other_cn")
    Image.fromarray(np.full((r, r), 128, np.uint8)).save(d / "grey_mask.png")
    Image.fromarray(mask[::2, ::2]).save(d / "small_mask.png")
    (d / "layout.json").write_text(json.dumps([{"box": [0.1, 0.1, 0.5, 0.5], "phrase": "red circle"}]))
    return Inputs(str(d / "model"), str(d / "image.png"), str(d / "mask.png"), str(d / "scene.json"),
                  str(d / "cases.jsonl"), str(d / "nan.safetensors"), str(d / "big.json"), str(d / "real"),
                  str(d / "tall.png"), str(d / "deep.json"), str(d / "latin1.json"), str(d / "typo.json"),
                  str(d / "future.json"), str(control_model_dir), str(d / "other_cn"), str(d / "grey_mask.png"),
                  str(d / "small_mask.png"), str(d / "layout.json"))


# ------------------------------------------------------------------------------------------ output locations
# Each makes the output location a row writes to (under `tmp`) and returns the path to pass on the command line.


def _precious_folder(tmp: Path) -> str:
    (tmp / "precious").mkdir()
    (tmp / "precious" / "thesis.txt").write_text("thesis")
    return str(tmp / "precious")


def _existing_file(tmp: Path, name: str = "thesis.txt") -> str:
    (tmp / name).write_text("thesis")
    return str(tmp / name)


def _existing_folder(tmp: Path) -> str:
    (tmp / "folder").mkdir()
    return str(tmp / "folder")


def _under_a_file(tmp: Path, name: str = "out.png") -> str:
    (tmp / "file").write_text("not a folder")
    return str(tmp / "file" / name)


def _unwritable(tmp: Path, name: str = "out") -> str:
    if ROOT_WRITES_ANYWHERE:
        return f"/sys/{name}"  # read-only for root too
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)
    return str(tmp / "locked" / name)


def _fresh(tmp: Path, name: str = "out") -> str:
    return str(tmp / name)


def _cwd(tmp: Path) -> str:
    (tmp / "thesis.txt").write_text("thesis")
    os.chdir(tmp)
    return "."


@dataclass
class Row:
    id: str
    argv: Callable[[Inputs, str], list[str]]  # (inputs, output path) -> command line
    out: Callable[[Path], str] = _fresh


def _rows() -> list[Row]:
    rows: list[Row] = []

    def add(cmd: str, argv: Callable[[Inputs, str], list[str]], **kinds: Callable[[Path], str]) -> None:
        for kind, make in kinds.items():
            rows.append(Row(f"{cmd}:{kind}", argv, make))

    folder_out = dict(existing_non_empty_folder=_precious_folder, existing_file=_existing_file, dot=_cwd,
                      unwritable=_unwritable, under_a_file=lambda t: _under_a_file(t, "out"))  # fmt: skip

    def file_out(suffix: str) -> dict[str, Callable[[Path], str]]:
        return dict(existing_folder=_existing_folder, existing_file=lambda t: _existing_file(t, "old" + suffix),
                    dot=_cwd, unwritable=lambda t: _unwritable(t, "out" + suffix),
                    under_a_file=lambda t: _under_a_file(t, "out" + suffix))  # fmt: skip

    # ---- commands that write a folder
    add("demo", lambda i, o: ["demo", "--out", o, "--model", i.model, "--seeds", "1", "--steps", "2"], **folder_out)
    add("generate", lambda i, o: ["generate", "--model", i.model, "--prompt", "a red circle", "--steps", "1", "-n", "1",
                                  "--out", o], **folder_out)  # fmt: skip
    add("edit", lambda i, o: ["edit", i.image, "--source-prompt", "a red circle", "--prompt", "a blue circle",
                              "--model", i.model, "--steps", "1", "--out", o], **folder_out)  # fmt: skip
    add("compose", lambda i, o: ["compose", "--from", f"{i.image}:sketch", "--model", i.model, "--steps", "1",
                                 "--out", o], **folder_out)  # fmt: skip
    add("data-export", lambda i, o: ["data", "export", "--n", "1", "--out", o], **folder_out)
    add("train", lambda i, o: ["train", "vae", "--max-steps", "1", "--batch-size", "1", "--out", o,
                               "--no-progress"], **folder_out)  # fmt: skip
    add("zoo-ship-t2i", lambda i, o: ["zoo", "ship", "t2i", "--bundle", i.model, "--no-parts", "--out", o],
        **folder_out)
    add("data-cache-latents", lambda i, o: ["data", "cache-latents", "--vae", i.model, "--n", "1", "--out", o],
        existing_non_empty_folder=_precious_folder, existing_file=_existing_file, unwritable=_unwritable,
        under_a_file=lambda t: _under_a_file(t, "out"))  # fmt: skip
    # ---- commands that write a file
    add("data-show", lambda i, o: ["data", "show", "--n", "1", "--out", o], **file_out(".png"))
    add("data-render", lambda i, o: ["data", "render", i.scene, "--out", o], **file_out(".png"))
    add("annotate", lambda i, o: ["annotate", "canny", i.image, "--out", o], **file_out(".png"))
    add("layout-draw", lambda i, o: ["layout", "draw", i.layout, "--out", o], **file_out(".png"))
    add("layout-plan", lambda i, o: ["layout", "plan", "--prompt", "a red circle", "--out", o], **file_out(".json"))
    add("judge-json", lambda i, o: ["judge", i.image, "--prompt", "a red circle", "--json", o], **file_out(".json"))
    add("judge-validate-json", lambda i, o: ["judge", "validate", "--n", "1", "--json", o], **file_out(".json"))
    add("invert", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model", i.model, "--steps", "1",
                                "--out", o], **file_out(".safetensors"))  # fmt: skip
    add("invert-reconstruct", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model", i.model,
                                            "--steps", "1", "--out", o + ".safetensors", "--reconstruct", o],
        **file_out(".png"))  # fmt: skip
    add("bench-make-cases", lambda i, o: ["bench", "make-cases", "--suite", "t2i", "--n", "1", "--out", o],
        **file_out(".jsonl"))
    add("bench-run", lambda i, o: ["bench", "run", "--cases", i.cases, "--rows", "ground_truth", "--model", i.model,
                                   "--json", o, "--quiet"], **file_out(".json"))  # fmt: skip
    add("bench-fidelity", lambda i, o: ["bench", "fidelity", "--real", i.real, "--fake", i.real, "--model", i.model,
                                        "--json", o], **file_out(".json"))  # fmt: skip
    add("bench-components", lambda i, o: ["bench", "components", "--model", i.model, "--n", "2", "--json", o],
        **file_out(".json"))

    # ---- numbers, sizes, devices and silently ignored options (the output must not appear)
    def number(cmd: str, argv: Callable[[Inputs, str], list[str]], name: str = "out") -> None:
        rows.append(Row(cmd, argv, lambda t: _fresh(t, name)))

    number("layout-plan:seed=-1", lambda i, o: ["layout", "plan", "--prompt", "a red circle", "--seed", "-1",
                                               "--out", o], "l.json")
    number("layout-draw:size-huge", lambda i, o: ["layout", "draw", i.layout, "--size", "100000", "--out", o], "l.png")
    gen = ["generate", "--prompt", "a red circle", "--steps", "1", "-n", "1"]
    number("generate:height-huge", lambda i, o: [*gen, "--model", i.model, "--height", "100000", "--out", o])
    number("generate:n-huge", lambda i, o: [*gen[:-2], "-n", "100000", "--model", i.model, "--out", o])
    number("generate:replay-height-huge", lambda i, o: ["generate", "--replay", i.big_replay, "--model", i.model,
                                                        "--out", o])  # fmt: skip
    number("generate:height-not-multiple", lambda i, o: [*gen, "--model", i.model, "--height", "30", "--out", o])
    number("generate:steps-past-training", lambda i, o: [*gen[:-4], "--steps", "5000", "--model", i.model,
                                                         "--out", o])  # fmt: skip
    for value in ("nan", "inf", "-1"):
        number(f"generate:cfg={value}", lambda i, o, v=value: [*gen, "--model", i.model, "--cfg", v, "--out", o])
    number("generate:seed=-1", lambda i, o: [*gen, "--model", i.model, "--seed", "-1", "--out", o])
    number("generate:eta=nan", lambda i, o: [*gen, "--model", i.model, "--eta", "nan", "--out", o])
    number("generate:s0=nan", lambda i, o: [*gen, "--model", i.model, "--guide", "palette", "--guide-target", i.image,
                                            "--s0", "nan", "--out", o])  # fmt: skip
    number("generate:nan-latents", lambda i, o: [*gen, "--model", i.model, "--latents", i.nan_latents, "--out", o])
    number("generate:device-bogus", lambda i, o: [*gen, "--model", i.model, "--device", "gpu7", "--out", o])
    if not torch.cuda.is_available():
        number("generate:device-cuda", lambda i, o: [*gen, "--model", i.model, "--device", "cuda", "--out", o])
        number("invert:device-cuda", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model", i.model,
                                                   "--device", "cuda", "--out", o], "x.safetensors")  # fmt: skip
        number("bench-run:device-cuda", lambda i, o: ["bench", "run", "--cases", i.cases, "--model", i.model,
                                                      "--device", "cuda", "--json", o], "r.json")  # fmt: skip
    number("generate:mask-feather-nan", lambda i, o: [*gen, "--model", i.model, "--init-image", i.image, "--mask",
                                                      i.mask, "--feather", "nan", "--out", o])  # fmt: skip
    number("compose:weight-nan", lambda i, o: ["compose", "--from", f"{i.image}:sketch", "--model", i.model,
                                               "--weight", "nan", "--out", o])  # fmt: skip
    number("compose:unknown-representation", lambda i, o: ["compose", "--from", f"{i.image}:colour", "--model",
                                                           i.model, "--out", o])  # fmt: skip
    number("compose:model-without-composer", lambda i, o: ["compose", "--from", f"{i.image}:sketch", "--model",
                                                           i.model, "--steps", "1", "--out", o])  # fmt: skip
    number("edit:strength-nan", lambda i, o: ["edit", i.image, "--source-prompt", "a red circle", "--prompt",
                                              "a blue circle", "--model", i.model, "--strength", "nan", "--out", o])
    number("invert:reconstruct-scheduler-alone", lambda i, o: ["invert", i.image, "--prompt", "a red circle",
                                                               "--model", i.model, "--reconstruct-scheduler", "euler",
                                                               "--out", o], "x.safetensors")  # fmt: skip
    number("invert:reconstruct-cfg-alone", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model",
                                                         i.model, "--reconstruct-cfg", "3", "--out", o],
           "x.safetensors")  # fmt: skip
    number("invert:reconstruct-bad-suffix", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model",
                                                          i.model, "--reconstruct", o + ".txt", "--out", o],
           "x.safetensors")  # fmt: skip
    number("invert:image-huge", lambda i, o: ["invert", i.tall, "--prompt", "a red circle", "--model", i.model,
                                              "--out", o], "x.safetensors")  # fmt: skip
    number("edit:image-huge", lambda i, o: ["edit", i.tall, "--source-prompt", "a red circle", "--prompt",
                                            "a blue circle", "--model", i.model, "--out", o])  # fmt: skip
    number("invert:cfg-nan", lambda i, o: ["invert", i.image, "--prompt", "a red circle", "--model", i.model,
                                           "--cfg", "nan", "--out", o], "x.safetensors")  # fmt: skip
    number("data-spec:seed=-1", lambda i, o: ["data", "spec", "--seed", "-1"])
    number("data-spec:index=-1", lambda i, o: ["data", "spec", "--index", "-1"])
    number("data-show:n-huge", lambda i, o: ["data", "show", "--n", "100000", "--out", o], "g.png")
    number("data-show:resolution-huge", lambda i, o: ["data", "show", "--resolution", "100000", "--out", o], "g.png")
    number("data-export:seed=-1", lambda i, o: ["data", "export", "--n", "1", "--seed", "-1", "--out", o])
    number("data-export:start=-1", lambda i, o: ["data", "export", "--n", "1", "--start", "-1", "--out", o])
    number("data-cache-latents:workers=-1", lambda i, o: ["data", "cache-latents", "--vae", i.model, "--n", "1",
                                                     "--workers", "-1", "--out", o])  # fmt: skip
    number("bench-make-cases:seed=-1", lambda i, o: ["bench", "make-cases", "--suite", "t2i", "--seed", "-1",
                                                     "--out", o], "c.jsonl")  # fmt: skip
    number("bench-run:cfg=nan", lambda i, o: ["bench", "run", "--cases", i.cases, "--model", i.model, "--cfg", "nan",
                                              "--json", o], "r.json")  # fmt: skip
    number("bench-run:json-md", lambda i, o: ["bench", "run", "--cases", i.cases, "--model", i.model, "--json", o],
           "r.md")
    number("bench-components:n=-1", lambda i, o: ["bench", "components", "--model", i.model, "--n", "-1", "--json", o],
           "c.json")
    number("judge-validate:seed=-1", lambda i, o: ["judge", "validate", "--n", "1", "--seed", "-1", "--json", o],
           "v.json")
    number("judge-validate:resolution-huge", lambda i, o: ["judge", "validate", "--n", "1", "--resolution", "100000",
                                                           "--json", o], "v.json")  # fmt: skip
    number("judge-image:json-is-its-input", lambda i, o: ["judge", i.image, "--prompt", "a red circle", "--json",
                                                          i.image, "--overwrite"])  # fmt: skip
    number("data-render:version-99", lambda i, o: ["data", "render", i.future_scene, "--out", o], "r.png")
    number("judge-validate:prompt", lambda i, o: ["judge", "validate", "--n", "1", "--prompt", "a red circle",
                                                  "--json", o], "v.json")  # fmt: skip
    number("judge-validate:workers-huge", lambda i, o: ["judge", "validate", "--n", "1", "--workers", "100000",
                                                        "--json", o], "v.json")  # fmt: skip
    number("judge-image:n", lambda i, o: ["judge", i.image, "--prompt", "a red circle", "--n", "5", "--json", o],
           "v.json")
    number("judge-image:layout-without-scene", lambda i, o: ["judge", i.image, "--prompt", "a red circle", "--layout",
                                                             "--json", o], "v.json")  # fmt: skip
    train = ["train", "vae", "--max-steps", "1", "--batch-size", "1", "--no-progress"]
    for setting in ("lr=nan", "lr=inf", "lr=-1", "seed=-1", "ema_decay=nan", "warmup_steps=1e400", "data=../nope",
                    "adam_beta1=1", "grad_accum=99999999999"):
        number(f"train:set-{setting}", lambda i, o, s=setting: [*train, "--set", s, "--out", o])
    number("train:batch-huge", lambda i, o: [*train[:4], "--batch-size", "99999999999", "--out", o])
    number("train:max-steps-twice", lambda i, o: [*train, "--set", "max_steps=5", "--out", o])
    number("train:workers-huge", lambda i, o: [*train, "--set", "num_workers=100000", "--out", o])
    number("train:max-minutes-nan", lambda i, o: [*train, "--max-minutes", "nan", "--out", o])
    number("annotate:resolution-without-scene", lambda i, o: ["annotate", "canny", i.image, "--resolution", "64",
                                                              "--out", o], "e.png")  # fmt: skip
    number("generate:k-huge", lambda i, o: [*gen, "--model", i.model, "--guide", "palette", "--guide-target", i.image,
                                            "--k", "1000000000", "--out", o])  # fmt: skip
    number("generate:replay-deep-json", lambda i, o: ["generate", "--replay", i.deep, "--model", i.model, "--out", o])
    number("generate:replay-latin1", lambda i, o: ["generate", "--replay", i.latin1, "--model", i.model, "--out", o])
    number("data-render:unknown-field", lambda i, o: ["data", "render", i.typo_scene, "--out", o], "r.png")
    ship = ["zoo", "ship"]
    number("zoo-ship-t2i:n=0", lambda i, o: [*ship, "t2i", "--bundle", i.model, "--n", "0", "--out", o])
    number("zoo-ship-t2i:cfg=nan", lambda i, o: [*ship, "t2i", "--bundle", i.model, "--cfg", "1,nan", "--out", o])
    number("zoo-ship-t2i:cfg-and-no-sweep", lambda i, o: [*ship, "t2i", "--bundle", i.model, "--cfg", "1",
                                                         "--no-sweep", "--out", o])  # fmt: skip
    number("zoo-ship-t2i:bundle-not-a-bundle", lambda i, o: [*ship, "t2i", "--bundle", i.real, "--out", o])
    number("zoo-ship-t2i:parts-missing", lambda i, o: [*ship, "t2i", "--bundle", i.model, "--parts", "nope.md",
                                                      "--out", o])  # fmt: skip
    number("zoo-ship-clip:at-least=1.5", lambda i, o: [*ship, "clip", "--run", i.model, "--at-least", "1.5",
                                                      "--out", o])  # fmt: skip
    number("zoo-ship-clip:val-seed=-1", lambda i, o: [*ship, "clip", "--run", i.model, "--val-seed", "-1",
                                                     "--out", o])  # fmt: skip
    number("zoo-ship-clip:run-without-export", lambda i, o: [*ship, "clip", "--run", i.model, "--out", o])
    number("zoo-ship-inpainting:seed=-1", lambda i, o: [*ship, "inpainting", "--run", i.model, "--seed", "-1",
                                                       "--out", o])  # fmt: skip
    number("zoo-ship-inpainting:run-without-export", lambda i, o: [*ship, "inpainting", "--run", i.model,
                                                                   "--out", o])  # fmt: skip
    number("zoo-ship-control:run-not-a-run", lambda i, o: [*ship, "control", "--run", i.model, "--out", o])
    number("zoo-curve:run-not-a-run", lambda i, o: ["zoo", "curve", "--run", i.model, "--out", o])
    number("zoo-curve:n=0", lambda i, o: ["zoo", "curve", "--run", i.model, "--n", "0", "--out", o])
    number("annotate:param-nan", lambda i, o: ["annotate", "canny", i.image, "-p", "low=nan", "--out", o], "e.png")
    # ---- --control SPEC (ControlNet / T2I-Adapter; the model carries controlnet_canny and adapter_depth)
    ctl = ["generate", "--prompt", "a red circle", "--steps", "1", "-n", "1"]
    control_rows = {
        "unknown-name": lambda i: f"cany={i.image}",
        "no-image": lambda i: "canny",
        "unknown-key": lambda i: f"canny={i.image},strength=1",
        "bad-number": lambda i: f"canny={i.image},weight=lots",
        "start-after-end": lambda i: f"canny={i.image},start=0.7,end=0.3",
        "negative-weight": lambda i: f"canny={i.image},weight=-1",
        "mode-on-adapter": lambda i: f"depth={i.image},mode=prompt",
        "unknown-mode": lambda i: f"canny={i.image},mode=loud",
        "image-missing": lambda i: "canny=no_such_edges.png",
        "mask-not-binary": lambda i: f"canny={i.image},mask={i.grey_mask}",
        "mask-other-size": lambda i: f"canny={i.image},mask={i.small_mask}",
        "other-base": lambda i: f"controlnet={i.image},model={i.other_cn}",
    }
    for kind, spec in control_rows.items():
        number(f"generate:control-{kind}", lambda i, o, s=spec: [*ctl, "--model", i.controls, "--control", s(i),
                                                                 "--out", o])  # fmt: skip
    number("generate:control-alias-not-in-model", lambda i, o: [*ctl, "--model", i.model, "--control",
                                                                f"canny={i.image}", "--out", o])  # fmt: skip
    number("generate:replay-with-control", lambda i, o: ["generate", "--replay", i.big_replay, "--control",
                                                         f"canny={i.image}", "--out", o])  # fmt: skip
    number("edit:control-unknown-name", lambda i, o: ["edit", i.image, "--source-prompt", "a red circle", "--prompt",
                                                      "a blue circle", "--model", i.controls, "--steps", "1",
                                                      "--control", f"cany={i.image}", "--out", o])  # fmt: skip
    return rows


ROWS = _rows()

# what the one error line of a numbers row must name (an output row's line names its output path)
EXPECT = {
    "layout-plan:seed=-1": "--seed", "layout-draw:size-huge": "--size",
    "generate:height-huge": "--max-side", "generate:n-huge": "--max-images",
    "generate:replay-height-huge": "--max-side",
    "generate:height-not-multiple": "nearest valid height is 32", "generate:steps-past-training": "training timesteps",
    "generate:cfg=nan": "--cfg", "generate:cfg=inf": "--cfg", "generate:cfg=-1": "--cfg", "generate:seed=-1": "--seed",
    "generate:eta=nan": "--eta", "generate:s0=nan": "--s0", "generate:nan-latents": "NaN",
    "generate:device-bogus": "gpu7", "generate:device-cuda": "has: cpu", "invert:device-cuda": "has: cpu",
    "bench-run:device-cuda": "has: cpu", "generate:mask-feather-nan": "--feather", "edit:strength-nan": "--strength",
    "compose:weight-nan": "--weight", "compose:unknown-representation": "unknown representation 'colour'",
    "compose:model-without-composer": "no composer or composer_unet component",
    "invert:reconstruct-scheduler-alone": "needs --reconstruct", "invert:reconstruct-cfg-alone": "needs --reconstruct",
    "invert:reconstruct-bad-suffix": ".png", "invert:image-huge": "--max-side", "edit:image-huge": "--max-side",
    "invert:cfg-nan": "--cfg", "data-spec:seed=-1": "--seed",
    "data-spec:index=-1": "--index", "data-show:n-huge": "100000", "data-show:resolution-huge": "resolution",
    "data-export:seed=-1": "--seed", "data-export:start=-1": "--start", "data-cache-latents:workers=-1": "--workers",
    "bench-make-cases:seed=-1": "--seed", "bench-run:cfg=nan": "--cfg", "bench-run:json-md": ".json",
    "bench-components:n=-1": "--n", "judge-validate:seed=-1": "--seed", "judge-validate:resolution-huge": "resolution",
    "train:set-lr=nan": "'lr'", "train:set-lr=inf": "'lr'", "train:set-lr=-1": "'lr'", "train:set-seed=-1": "'seed'",
    "train:set-ema_decay=nan": "'ema_decay'", "train:set-warmup_steps=1e400": "'warmup_steps'",
    "train:set-data=../nope": "../nope", "annotate:resolution-without-scene": "--resolution needs --scene",
    "generate:k-huge": "k (self-recurrence", "generate:replay-deep-json": "nested too deeply",
    "generate:replay-latin1": "not UTF-8", "data-render:unknown-field": "backgroud",
    "train:max-minutes-nan": "--max-minutes", "judge-validate:prompt": "--prompt does not apply",
    "judge-validate:workers-huge": "--workers", "judge-image:n": "--n does not apply",
    "judge-image:layout-without-scene": "--layout", "judge-image:json-is-its-input": "is an input",
    "data-render:version-99": "version", "train:max-steps-twice": "give it once",
    "train:workers-huge": "num_workers", "train:set-adam_beta1=1": "'adam_beta1'",
    "train:set-grad_accum=99999999999": "'grad_accum'", "train:batch-huge": "'batch_size'", "annotate:param-nan": "low",
    "zoo-ship-t2i:n=0": "--n", "zoo-ship-t2i:cfg=nan": "--cfg", "zoo-ship-t2i:cfg-and-no-sweep": "--no-sweep",
    "zoo-ship-t2i:bundle-not-a-bundle": "--bundle", "zoo-ship-t2i:parts-missing": "nope.md",
    "zoo-ship-clip:at-least=1.5": "--at-least", "zoo-ship-clip:val-seed=-1": "--val-seed",
    "zoo-ship-clip:run-without-export": "mmsynth train clip", "zoo-ship-inpainting:seed=-1": "--seed",
    "zoo-ship-inpainting:run-without-export": "mmsynth train inpaint",
    "zoo-ship-control:run-not-a-run": "mmsynth train controlnet", "zoo-curve:run-not-a-run": "has no config.yaml",
    "zoo-curve:n=0": "--n",
    "generate:control-unknown-name": "valid: this model's control components (adapter_depth, controlnet_canny)",
    "generate:control-no-image": "must look like NAME=IMAGE", "generate:control-unknown-key": "valid: weight, start",
    "generate:control-bad-number": "weight must be a number", "generate:control-start-after-end": "start=0.7, end=0.3",
    "generate:control-negative-weight": "weight must be >= 0", "generate:control-mode-on-adapter": "is a T2I-Adapter",
    "generate:control-unknown-mode": "valid: balanced, prompt, control", "generate:control-image-missing":
    "'no_such_edges.png' does not exist", "generate:control-mask-not-binary": "must be binary",
    "generate:control-mask-other-size": "mask is 16x16 but its image is 32x32",
    "generate:control-other-base": "was built for another base (block_out_channels (16, 32, 64)",
    "generate:control-alias-not-in-model": "which model", "generate:replay-with-control": "with --control",
    "edit:control-unknown-name": "unknown control 'cany'",
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under `root` (itself included) with its content hash and permission bits."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        mode = stat.S_IMODE(p.lstat().st_mode)
        content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (content, mode)
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(row, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = row.out(work)
    watched = tmp_path  # the output location, what lies beside it, and the working folder
    before = _snapshot(watched)
    try:
        code = main(row.argv(inputs, out))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2, f"exit {code}, expected 2\n{text}"
    assert "Traceback" not in text
    lines = captured.err.strip().splitlines()
    assert lines and sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], captured.err
    assert EXPECT.get(row.id, out if out != "." else "'.'") in lines[-1]
    assert _snapshot(watched) == before, "the output location changed"
    if out.startswith("/sys/"):
        assert not Path(out).exists()


def test_every_numbers_row_says_what_its_error_names():
    numbers = [r.id for r in ROWS if r.id.split(":")[1] not in {"existing_non_empty_folder", "existing_file", "dot",
                                                                "unwritable", "under_a_file", "existing_folder"}]
    assert not [r for r in numbers if r not in EXPECT], "give each numbers row its expected word in EXPECT"


def test_the_sweep_covers_every_command():
    """A new command (or subcommand) without rows here fails this test: add its rows to the sweep."""
    import argparse

    from mmsynth.cli.main import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    names = []
    for cmd, sub in subcommands(build_parser()).items():
        names += [f"{cmd}-{s}" for s in subcommands(sub)] or [cmd]
    covered = {r.id.split(":")[0] for r in ROWS}
    takes_no_input = {"bench-suites"}
    missing = [n for n in names
               if n not in takes_no_input and not any(c == n or c.startswith(n + "-") for c in covered)]
    assert not missing, f"commands without rows in the sweep: {missing}"
