"""Composer's networks and control: a UNet that starts as its base, representations decomposed from an image, any
subset of them through the one sampler, guidance between two condition sets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmsynth.errors import InputError
from mmsynth.models import Bundle
from mmsynth.models.composer import ComposerConditioner, composer_unet
from mmsynth.sample import Composer, GenerationRequest, sample
from mmsynth.sample.composer import COMPOSER, COMPOSER_UNET, decompose


def _conditioner(bundle, seed: int = 0) -> ComposerConditioner:
    torch.manual_seed(seed)
    net = ComposerConditioner(global_conditions={"caption": 32, "image": 32, "histogram": 275},
                              out_channels=4, factor=bundle.vae_scale_factor, context_dim=32,
                              tokens_per_condition=2, width=8)  # fmt: skip
    with torch.no_grad():  # the zero-initialised outputs would make every test vacuous
        for enc in net.local.values():
            enc.out.weight.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def composer(bundle):
    net = _conditioner(bundle)
    unet = composer_unet(bundle.unet, 4, net.global_dim)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:].normal_(0, 0.3)
        unet.class_embedding.linear_2.weight.normal_(0, 0.3)
    return dataclasses.replace(bundle, extras={COMPOSER_UNET: unet.eval(), COMPOSER: net})


def test_a_composer_unet_starts_as_its_base(bundle):
    net = _conditioner(bundle)
    unet = composer_unet(bundle.unet, 4, net.global_dim).eval()
    x, extra = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 6, 32)
    with torch.no_grad():
        base = bundle.unet(x, 10, context).sample
        ours = unet(torch.cat([x, extra], 1), 10, context, class_labels=torch.randn(2, net.global_dim)).sample
    torch.testing.assert_close(ours, base)


def test_decompose_makes_every_representation_the_conditioner_reads(bundle, gradient_image):
    mask = np.zeros(gradient_image.shape[:2], bool)
    mask[8:20, 8:20] = True
    reps = decompose(bundle, gradient_image, ["sketch", "segmentation", "intensity", "masked_image", "histogram",
                                              "image"], mask=mask)  # fmt: skip
    assert reps["masked_image"].shape == (32, 32, 4) and (reps["masked_image"][8:20, 8:20, :3] == 0).all()
    assert reps["histogram"].shape == (275,) and reps["image"].shape == (32,)
    assert reps["sketch"].dtype == np.uint8 and reps["segmentation"].shape == (32, 32, 3)
    with pytest.raises(InputError, match="depth cannot be estimated"):
        decompose(bundle, gradient_image, ["depth"])
    with pytest.raises(InputError, match="unknown representation 'colour'; valid: sketch"):
        decompose(bundle, gradient_image, ["colour"])


def test_each_representation_steers_and_none_is_the_null(composer, gradient_image):
    reps = decompose(composer, gradient_image, ["sketch", "intensity", "histogram", "image"])
    req = GenerationRequest(prompt="a red circle", steps=3, cfg=3.0, seed=1)
    full = sample(composer, req, [Composer(conditions=reps)], progress=False).latents
    for name in reps:
        fewer = {k: v for k, v in reps.items() if k != name}
        assert not torch.allclose(sample(composer, req, [Composer(conditions=fewer)], progress=False).latents, full,
                                  atol=1e-5), name


def test_guidance_between_two_equal_sets_is_sampling_that_set_unguided(composer, gradient_image):
    """eps = w * eps(c2) + (1 - w) * eps(c1) with c1 == c2 is eps(c2): the same as CFG 1 with c2."""
    reps = decompose(composer, gradient_image, ["sketch", "histogram"])
    req = GenerationRequest(prompt="a red circle", steps=3, cfg=4.0, seed=2)
    directed = sample(composer, req, [Composer(conditions=reps, reference=reps, weight=2.5)], progress=False)
    plain = sample(composer, dataclasses.replace(req, cfg=1.0), [Composer(conditions=reps)], progress=False)
    torch.testing.assert_close(directed.latents, plain.latents, atol=1e-5, rtol=1e-4)
    other = sample(composer, req, [Composer(conditions=reps, reference={"histogram": reps["histogram"]},
                                            weight=2.5)], progress=False)  # fmt: skip
    assert not torch.allclose(other.latents, plain.latents, atol=1e-4)


def test_the_conditioner_saves_and_loads_as_a_bundle_component(composer, tmp_path):
    loaded = Bundle.from_pretrained(composer.save_pretrained(tmp_path / "m"))
    net = loaded.extras[COMPOSER]
    assert isinstance(net, ComposerConditioner) and net.config.global_conditions == composer.extras[
        COMPOSER].config.global_conditions
    maps = {"sketch": torch.rand(1, 1, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(net.local_channels(maps, 1, (8, 8)),
                                   composer.extras[COMPOSER].local_channels(maps, 1, (8, 8)))


def test_bad_composer_requests_are_clear_errors(composer, bundle, gradient_image):
    reps = decompose(composer, gradient_image, ["sketch", "histogram"])
    with pytest.raises(InputError, match="unknown representation 'colour'"):
        Composer(conditions={"colour": reps["histogram"]})
    with pytest.raises(InputError, match="the caption is the prompt"):
        Composer(conditions={"caption": reps["histogram"]})
    with pytest.raises(InputError, match="no composer or composer_unet component"):
        sample(bundle, GenerationRequest(steps=2), [Composer(conditions=reps)], progress=False)
    with pytest.raises(InputError, match="'histogram' has 3 values; this model takes 275"):
        sample(composer, GenerationRequest(steps=2), [Composer(conditions={"histogram": [1.0, 2.0, 3.0]})],
               progress=False)
    with pytest.raises(InputError, match="'sketch' is 16x16 but the request generates 32x32"):
        sample(composer, GenerationRequest(steps=2), [Composer(conditions={"sketch": reps["sketch"][:16, :16]})],
               progress=False)


def test_the_recipe_drops_conditions_as_the_paper_and_trains_and_exports(tmp_path):
    from mmsynth.cli.main import main
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train import get_recipe, load_config

    with pytest.raises(InputError, match=r"drop_all' \+ 'options.keep_all' must be at most 1"):
        load_config(get_recipe("composer"), overrides={"options.drop_all": "0.6", "options.keep_all": "0.6"})
    tiny_bundle(seed=1).save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    rc = main(["train", "composer", "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--no-progress",
               "--set", f"options.base={tmp_path / 'base'}", "--set", "sample_every=2", "--set", "checkpoint_every=1",
               "--set", "warmup_steps=0", "--set", "lr_schedule=constant", "--set", "options.sample_steps=2",
               "--set", "num_workers=0"])  # fmt: skip
    assert rc == 0
    exported = Bundle.from_pretrained(out / "final")
    assert isinstance(exported.extras[COMPOSER], ComposerConditioner)
    assert exported.extras[COMPOSER_UNET].config.class_embed_type == "projection"
    assert (out / "final" / COMPOSER_UNET / "lora.safetensors").is_file()  # a LoRA + its new layers, not a copy
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())


def test_the_drop_schedule_keeps_all_drops_all_and_drops_intensity_most():
    from mmsynth.train.recipes.composer import ComposerOptions, ComposerRecipe

    recipe = ComposerRecipe.__new__(ComposerRecipe)
    recipe.options = ComposerOptions()
    torch.manual_seed(0)
    n = 20000
    keep = recipe.drop_conditions({"caption": ["x"] * n})["keep"]
    rates = {k: float(v.float().mean()) for k, v in keep.items()}
    # kept: 0.1 (all kept) + 0.8 * (1 - p): 0.5 for p = 0.5, 0.34 for intensity's 0.7
    assert abs(rates["sketch"] - 0.5) < 0.02 and abs(rates["intensity"] - 0.34) < 0.02
    stacked = torch.stack(list(keep.values()))
    assert abs(float((~stacked).all(dim=0).float().mean()) - (0.1 + 0.8 * 0.5**8 * 0.7 / 0.5)) < 0.02


def test_compose_recombines_representations_of_two_images_from_the_cli(composer, tmp_path, capsys):
    from PIL import Image

    from mmsynth.cli.main import main
    from mmsynth.data.render import render
    from mmsynth.data.scene import sample_scene

    model = composer.save_pretrained(tmp_path / "m")
    a, b = sample_scene("test", 0), sample_scene("test", 1)
    Image.fromarray(render(b, 32)).save(tmp_path / "b.png")
    (tmp_path / "a.json").write_text(__import__("json").dumps(a.to_dict()))
    out = tmp_path / "o"
    assert main(["compose", "--model", str(model), "--from", f"{tmp_path / 'a.json'}:sketch,depth", "--from",
                 f"{tmp_path / 'b.png'}:histogram", "--prompt", "a red circle", "--steps", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "images" / "0000.png").is_file() and (out / "representations.png").is_file()
    request = __import__("json").loads((out / "request.json").read_text())
    assert request["controls"][0]["name"] == "composer" and set(request["controls"][0]["conditions"]) == {
        "sketch", "depth", "histogram"}
    again = tmp_path / "again"  # the request (maps as PNG data, vectors as arrays) replays through generate
    assert main(["generate", "--replay", str(out / "requests" / "0000.json"), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again / "images" / "0000.png")),
                          np.asarray(Image.open(out / "images" / "0000.png")))
    capsys.readouterr()
    assert main(["compose", "--model", str(model), "--from", f"{tmp_path / 'b.png'}:colour", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "unknown representation 'colour'" in capsys.readouterr().err
    assert main(["compose", "--model", str(model), "--from", f"{tmp_path / 'b.png'}:depth", "--out",
                 str(tmp_path / "o3")]) == 2  # no depth estimator for an image: one line, no traceback
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_the_control_suite_composer_row_runs_each_category_on_its_representation(composer, bundle):
    from mmsynth.evaluate.bench import RunContext, SamplerSettings
    from mmsynth.evaluate.bench.cases import Case
    from mmsynth.evaluate.bench.control_suite import COMPOSER_REPRESENTATIONS, make_cases
    from mmsynth.evaluate.bench.runner import RunOptions, run_bench

    cases = [dataclasses.replace(c, resolution=32) for c in make_cases(1, 5)
             if c.category in COMPOSER_REPRESENTATIONS]  # fmt: skip
    assert all(isinstance(c, Case) for c in cases) and len(cases) == 4

    def ctx(b):
        return RunContext(bundle_obj=b, sampler=SamplerSettings(steps=2))

    skipped = run_bench(cases, ctx(bundle), RunOptions(rows=["composer"])).to_dict()
    assert skipped["rows"]["control"]["composer"]["n_skipped"] == 4
    res = run_bench(cases, ctx(composer), RunOptions(rows=["composer"])).to_dict()["results"]["control"]["composer"]
    assert {"sketch_ssim", "segmentation_miou", "depth_order", "palette_error"} <= set(res)
