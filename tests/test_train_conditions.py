"""The recipe base: declared condition maps reach the batch from each source; nothing to train is an error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from mmsynth.annotate.registry import get_annotator
from mmsynth.data.annotations import annotate_scene
from mmsynth.data.export import export_split
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.models.zoo import tiny_bundle
from mmsynth.train import Recipe, get_recipe, load_config, register_recipe, train
from mmsynth.train.recipes import RECIPES
from mmsynth.train.recipes.t2i import TextToImageRecipe
from mmsynth.viz import colorize_labels

FAST = {"num_workers": "0", "log_every": "1", "warmup_steps": "0", "sample_every": "0", "ema": "false",
        "max_steps": "1", "batch_size": "2"}  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state()


class MapRecipe(Recipe):
    """A toy recipe that declares condition maps and keeps every batch it was given."""

    name = "toy-maps"
    conditions: ClassVar[tuple[str, ...]] = ("depth", "segmentation", "edges", "canny")
    seen: ClassVar[list[dict[str, Any]]] = []

    def build(self) -> None:
        self.models = {"head": torch.nn.Conv2d(1, 1, 1)}
        self.trainable = ("head",)

    @property
    def resolution(self) -> int:
        return 32

    def loss(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        type(self).seen.append(batch)
        return self.models["head"](batch["canny"]).mean(), {}

    def export(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return out


@pytest.fixture
def toy():
    register_recipe(MapRecipe.name, MapRecipe)
    MapRecipe.seen, declared = [], MapRecipe.conditions
    yield MapRecipe
    MapRecipe.conditions = declared
    RECIPES.pop(MapRecipe.name, None)


def _batch(recipe_cls, out, **overrides) -> dict[str, Any]:
    config, options = load_config(get_recipe(recipe_cls.name), overrides={**FAST, "out": str(out), **overrides})
    train(config, options, progress=False)
    return recipe_cls.seen[-1]


def as_map(array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(array).float() / 255
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def test_declared_maps_come_from_the_shapes_spec(tmp_path, toy):
    batch = _batch(toy, tmp_path / "run", data="shapes", data_seed="3")
    for i, index in enumerate(batch["index"]):
        scene = sample_scene("train", index, 3)
        exact = annotate_scene(scene, 32).maps
        assert torch.equal(batch["depth"][i], as_map(exact["depth"]))  # exact, from the data layer
        # exact, through the spec, colour-coded as a control network sees it (annotate.network_input)
        assert torch.equal(batch["segmentation"][i], as_map(colorize_labels(exact["semantic"])))
        assert torch.equal(batch["edges"][i], as_map(exact["edges"]))
        assert torch.equal(batch["canny"][i], as_map(get_annotator("canny")(annotate_scene(scene, 32).image)))
    assert batch["depth"].shape == (2, 1, 32, 32) and batch["depth"].dtype == torch.float32


def test_declared_maps_come_from_an_exchange_folders_columns_or_an_annotator(tmp_path, toy):
    folder = export_split("train", 2, tmp_path / "export", seed=4, resolution=32, progress=False)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    stripes = np.zeros((32, 32), np.uint8)
    stripes[::2] = 255  # no scene has these edges: the batch can only have read them from the column
    for row in rows:
        Image.fromarray(stripes).save(folder / row["edges_file_name"])
        row.pop("scene")  # no spec: maps the folder lacks come from an annotator on the pixels
        row.pop("depth_file_name")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    toy.conditions = ("edges", "canny")
    batch = _batch(toy, tmp_path / "run", data=str(folder))
    for i in range(2):
        assert torch.equal(batch["edges"][i], as_map(stripes))
        image = ((batch["pixel_values"][i].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        assert torch.equal(batch["canny"][i], as_map(get_annotator("canny")(image)))
    toy.conditions = ("depth",)  # only from a spec, which these rows no longer have
    with pytest.raises(InputError, match="depth"):
        _batch(toy, tmp_path / "run2", data=str(folder))


def test_declared_maps_are_checked_and_a_latent_cache_cannot_give_them(tmp_path, toy):
    toy.conditions = ("cany",)
    with pytest.raises(InputError, match=r"declares condition map 'cany'; valid maps: .*canny"):
        _batch(toy, tmp_path / "run", data="shapes")
    from mmsynth.train.data import training_examples

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latent_cache.json").write_text("{}")
    with pytest.raises(InputError, match="keeps no images or scenes"):
        training_examples(str(tmp_path / "cache"), conditions=("canny",))


def test_a_recipe_with_nothing_to_train_is_an_error_and_frozen_parts_stay_out(tmp_path, toy):
    class Frozen(MapRecipe):
        name = "toy-frozen"

        def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
            super().place(device, weight_dtype)
            self.models["head"].requires_grad_(False)

    register_recipe(Frozen.name, Frozen)
    try:
        with pytest.raises(InputError, match=r"recipe 'toy-frozen' has nothing to train: .*\(head\)"):
            _batch(Frozen, tmp_path / "frozen")
    finally:
        RECIPES.pop(Frozen.name)

    base = tmp_path / "base"
    tiny_bundle(seed=1).save_pretrained(base)

    class FrozenUnet(TextToImageRecipe):  # a denoising recipe whose subclass forgot to mark its network
        def build(self) -> None:
            super().build()
            self.trainable = ()

    class HalfUnet(TextToImageRecipe):  # trains only the UNet's decoder
        def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
            super().place(device, weight_dtype)
            self.models["unet"].down_blocks.requires_grad_(False)

    config, options = load_config(get_recipe("t2i"), overrides={**FAST, "options.base": str(base)})
    frozen = FrozenUnet(config, options)
    frozen.build()
    frozen.place(torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match=r"has nothing to train: .*none marked"):
        frozen.parameters()
    half = HalfUnet(config, options)
    half.build()
    half.place(torch.device("cpu"), torch.float32)
    params = {id(p) for g in half.parameters() for p in g["params"]}
    unet = half.models["unet"]
    assert params and not params & {id(p) for p in unet.down_blocks.parameters()}
    assert {id(p) for p in unet.up_blocks.parameters()} <= params
