"""The control recipes (controlnet, t2i-adapter) through the one trainer, on tiny bundles: only the control
trains, the exports load with diffusers, the paper's dropout and timestep settings, resume, bad configs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import ControlNetModel, T2IAdapter

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle, load_component
from mmsynth.models.zoo import TINY, random_bundle, tiny_bundle
from mmsynth.train import get_recipe, load_config, train
from mmsynth.train.recipes import RECIPES

FAST = {"num_workers": "0", "log_every": "1", "warmup_steps": "1", "sample_every": "0", "batch_size": "2",
        "options.save_dtype": "float32"}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tests' tiny bundle (no cross-attention in its first down block: a ControlNet fits, an adapter not)."""
    path = tmp_path_factory.mktemp("zoo") / "tiny"
    tiny_bundle(seed=1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_xattn(tmp_path_factory):
    """A tiny bundle with cross-attention in every down block, as the zoo's: what a full T2I-Adapter needs."""
    path = tmp_path_factory.mktemp("zoo") / "tiny_xattn"
    spec = dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True))
    random_bundle(spec, seed=1).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state()


def options(recipe, out, **overrides):
    return load_config(get_recipe(recipe), overrides={**FAST, "out": str(out), **overrides})


def run(recipe, out, resume=False, stop_after=None, **overrides):
    return train(*options(recipe, out, **overrides), resume=resume, progress=False, stop_after=stop_after)


@pytest.fixture
def spy(monkeypatch):
    """Run a recipe through the trainer and keep the instance, to look at its frozen modules afterwards."""
    kept = []

    def wrap(name):
        cls = get_recipe(name)
        monkeypatch.setitem(RECIPES, name, type(cls.__name__, (cls,), {"build": lambda self: (kept.append(self),
                                                                                             cls.build(self))}))
        return kept

    return wrap


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def assert_base_untouched(recipe, path):
    fresh = Bundle.from_pretrained(path)
    for name in ("unet", "vae", "text_encoder"):
        assert same_weights(recipe.models[name], getattr(fresh, name)), name


@pytest.mark.parametrize("condition", ["canny", "segmentation"])
def test_controlnet_trains_only_itself_and_exports_what_diffusers_loads(tmp_path, base, spy, condition):
    kept = spy("controlnet")
    out = tmp_path / "cn"
    result = run("controlnet", out, max_steps="2", sample_every="2", export_every="1", **{
        "options.base": str(base), "options.condition": condition, "options.sample_scenes": "1",
        "options.sample_steps": "2"})  # fmt: skip
    assert_base_untouched(kept[0], base)
    controlnet = ControlNetModel.from_pretrained(result.export / "controlnet")
    assert controlnet.config.conditioning_channels == 3
    assert list(controlnet.config.conditioning_embedding_out_channels) == [16, 32, 96]  # down by the VAE's 4
    assert float(controlnet.controlnet_mid_block.weight.detach().abs().max()) > 0  # the zero convolutions trained
    assert same_weights(load_component(result.export, "controlnet"), controlnet)  # listed as a component
    for step in (1, 2):  # intermediate exports for a metric against steps
        assert ControlNetModel.from_pretrained(out / "exports" / f"step_{step:07d}" / "controlnet") is not None
    assert (out / "samples" / "step_0000002.png").is_file()


def test_controlnet_empties_half_the_captions_and_draws_uniform_timesteps(base):
    from mmsynth.models.zoo import build_scheduler

    recipe = get_recipe("controlnet")(*options("controlnet", "unused"))
    assert recipe.options.caption_dropout == 0.5
    torch.manual_seed(0)
    dropped = recipe.drop_conditions({"caption": ["a red circle"] * 4000})["caption"]
    assert abs(sum(c == "" for c in dropped) / 4000 - 0.5) < 0.03
    recipe.set_scheduler(build_scheduler())
    assert abs(float(recipe.draw_timesteps(20000).float().mean()) - 499.5) < 10


def test_adapter_draws_cubic_timesteps_and_keeps_t2i_caption_dropout():
    from mmsynth.models.zoo import build_scheduler

    recipe = get_recipe("t2i-adapter")(*options("t2i-adapter", "unused"))
    assert recipe.timestep_sampling == "cubic" and recipe.options.caption_dropout == 0.1
    recipe.set_scheduler(build_scheduler())
    torch.manual_seed(0)
    t = recipe.draw_timesteps(20000).float()
    assert abs(float(t.mean()) - 750) < 10  # E[(1 - u^3) T] = 3T/4
    assert float((t >= 500).float().mean()) == pytest.approx(0.5 ** (1 / 3), abs=0.02)  # P(u^3 <= 1/2), not 1/2


def test_adapter_trains_only_itself_resumes_exactly_and_exports_what_diffusers_loads(tmp_path, base_xattn, spy):
    kept = spy("t2i-adapter")
    common = {"checkpoint_every": "1", "options.base": str(base_xattn), "options.condition": "depth",
              "options.conditioning_channels": "1"}  # fmt: skip
    once = run("t2i-adapter", tmp_path / "once", max_steps="2", sample_every="2", **common, **{
        "options.sample_scenes": "1", "options.sample_steps": "2"})  # fmt: skip
    assert (tmp_path / "once" / "samples" / "step_0000002.png").is_file()
    assert_base_untouched(kept[0], base_xattn)
    run("t2i-adapter", tmp_path / "split", max_steps="2", stop_after=1, **common)
    split = run("t2i-adapter", tmp_path / "split", max_steps="2", resume=True, **common)
    a, b = T2IAdapter.from_pretrained(once.export / "adapter"), T2IAdapter.from_pretrained(split.export / "adapter")
    assert a.config.in_channels == 1 and a.config.downscale_factor == 4
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
    fresh = get_recipe("t2i-adapter")(*options("t2i-adapter", "unused", **common))
    torch.manual_seed(0)  # as the trainer seeds model initialisation (config.seed)
    fresh.build()
    assert not same_weights(fresh.models["adapter"], a)  # it trained (same seed, same initialisation)
    # the adapter's features reach the UNet at every down block
    features = a(torch.rand(1, 1, 32, 32))
    assert [tuple(f.shape[2:]) for f in features] == [(8, 8), (4, 4), (2, 2)]


def test_segmentation_reaches_a_network_colour_coded():
    from mmsynth.annotate.scene import from_scene
    from mmsynth.data.scene import sample_scene
    from mmsynth.train.conditions import condition_channels, prepared
    from mmsynth.viz import colorize_labels

    labels = from_scene("segmentation", sample_scene("train", 3), 32)
    coded = prepared("segmentation", labels)
    assert coded.shape == (3, 32, 32) and len(np.unique(labels)) > 1
    assert torch.equal(coded, torch.from_numpy(colorize_labels(labels)).permute(2, 0, 1).float() / 255)
    assert torch.equal(prepared("segmentation", colorize_labels(labels)), coded)  # an already coded map stays
    assert [condition_channels(k, 32) for k in ("canny", "depth", "xdog", "palette", "segmentation")] == [1, 1, 1, 3, 3]


def test_bad_control_configs_fail_with_one_clear_line(tmp_path, base, base_xattn):
    with pytest.raises(InputError, match=r"options.condition' declares condition map 'sparkles'; valid maps: .*canny"):
        options("controlnet", tmp_path / "a", **{"options.condition": "sparkles"})
    with pytest.raises(InputError, match=r"options\.conditioning_channels' must be 1 or 3, got 2"):
        options("t2i-adapter", tmp_path / "b", **{"options.conditioning_channels": "2"})
    with pytest.raises(InputError, match=r"'palette' gives 3-channel maps; the adapter takes 1: set "
                                         r"options\.conditioning_channels to 3"):
        run("t2i-adapter", tmp_path / "c", max_steps="1", **{"options.base": str(base_xattn),
            "options.condition": "palette", "options.conditioning_channels": "1"})  # fmt: skip
    with pytest.raises(InputError, match="'histogram' is a vector"):
        run("controlnet", tmp_path / "d", max_steps="1", **{"options.base": str(base),
            "options.condition": "histogram"})  # fmt: skip
    with pytest.raises(InputError, match="cross-attention in every down block"):
        run("t2i-adapter", tmp_path / "e", max_steps="1", **{"options.base": str(base)})
    first = run("controlnet", tmp_path / "f", max_steps="1", **{"options.base": str(base)})
    with pytest.raises(InputError, match=r"options.init .*takes 3-channel conditions, options.conditioning_channels "
                                         "is 1"):
        run("controlnet", tmp_path / "g", max_steps="1", **{"options.base": str(base), "options.condition": "depth",
            "options.init": str(first.export / "controlnet"), "options.conditioning_channels": "1"})  # fmt: skip
    assert not (tmp_path / "c").exists() and not (tmp_path / "g").exists()  # refused before the run folder
