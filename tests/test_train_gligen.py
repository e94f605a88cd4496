"""The `gligen` recipe (frozen base, grounding layers trained from closed gates, only they exported) and
`mmsynth zoo ship gligen` (the layers into a bundle as gligen/, loadable by name, measured and carded)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmsynth.cli.main import main
from mmsynth.models.bundle import Bundle
from mmsynth.sample.layout import scene_layout
from mmsynth.train.recipes.gligen import is_grounding_parameter

TRAIN = ["--set", "max_steps=2", "--set", "batch_size=2", "--set", "log_every=1", "--set", "sample_every=2",
         "--set", "checkpoint_every=1", "--set", "export_every=2", "--set", "options.sample_scenes=1",
         "--set", "options.sample_steps=2", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mmsynth.models.zoo import tiny_bundle

    root = tmp_path_factory.mktemp("gligen")
    tiny_bundle(0).save_pretrained(root / "zoo", dtype=torch.float16)
    run = root / "run"
    assert main(["train", "gligen", "--config", "configs/gligen.yaml", "--out", str(run), "--set",
                 f"options.base={root / 'zoo'}", *TRAIN]) == 0
    return root / "zoo", run


def test_the_recipe_trains_only_the_grounding_layers_and_exports_them(trained):
    _, run = trained
    layers = load_file(run / "final" / "gligen" / "layers.safetensors")
    assert layers and all(is_grounding_parameter(k) for k in layers)
    assert all(v.dtype == torch.float16 for v in layers.values())
    gates = [float(v) for k, v in layers.items() if k.endswith("alpha_attn")]
    assert any(g != 0.0 for g in gates)  # the gates moved off 0
    assert (run / "exports" / "step_0000002" / "gligen" / "layers.safetensors").is_file()
    assert (run / "samples").is_dir() and any((run / "samples").iterdir())


def test_a_run_resumes_from_its_last_checkpoint(trained, tmp_path):
    zoo, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["train", "gligen", "--config", "configs/gligen.yaml", "--out", str(copy), "--resume", "--set",
                 f"options.base={zoo}", *TRAIN[:-1], "--set", "max_steps=3", "--no-progress"]) == 0
    assert json.loads((copy / "summary.json").read_text())["step"] == 3


def test_scene_layout_is_every_object_with_its_phrase():
    from mmsynth.data.scene import sample_scene

    scene = sample_scene("train", 3)
    layout = scene_layout(scene)
    boxes, phrases = layout.boxes, layout.phrases
    assert phrases == [o.phrase for o in scene.objects] and len(boxes) == len(scene.objects)
    assert all(0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes)


def test_ship_gligen_puts_the_layers_in_the_bundle_measured_and_carded(trained, tmp_path, capsys):
    zoo, run = trained
    out = tmp_path / "zoo"
    shutil.copytree(zoo, out)
    argv = ["zoo", "ship", "gligen", "--run", str(run), "--out", str(out), "--n", "2", "--no-parts",
            "--reports", str(tmp_path / "reports")]
    assert main(argv) == 0
    manifest = json.loads((out / "mmsynth_components.json").read_text())
    assert manifest["components"]["gligen"]["base"] == "unet"
    net = Bundle.from_pretrained(out).extras["gligen"]
    assert net.config.attention_type == "gated"
    card = (out / "gligen" / "README.md").read_text()
    assert "mmsynth bench run --suite layout --n 2" in card and "| gligen | 2 |" in card
    assert main(argv) == 2  # a second shipment needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
