"""The inpainting UNet (Stable Diffusion inpainting's 2C + 1 input channels): its recipe, its place in a bundle, and
the inpaint control feeding it through the one sampler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.models.bundle import INPAINTING_UNET, Bundle
from mmsynth.models.zoo import tiny_bundle
from mmsynth.sample import BlendedInpaint, GenerationRequest, sample
from mmsynth.sample.inpaint import inpainting_channels
from mmsynth.sample.inversion import image_pixels
from mmsynth.sample.sampler import Context
from mmsynth.train.recipes.inpaint import InpaintOptions, inpainting_unet, training_mask


@pytest.fixture(scope="module")
def with_inpainting(bundle):
    """The tiny bundle carrying an inpainting UNet grown from its own UNet, then perturbed so that it differs."""
    unet = inpainting_unet(bundle.unet)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0.3 * torch.randn_like(unet.conv_in.weight[:, 4:])
    return dataclasses.replace(bundle, extras={INPAINTING_UNET: unet.eval()})


@pytest.fixture(scope="module")
def mask(bundle):
    r = bundle.resolution
    m = np.zeros((r, r), np.uint8)
    m[6:20, 8:24] = 255
    return m


def test_a_grown_inpainting_unet_predicts_what_its_base_predicts(bundle):
    unet = inpainting_unet(bundle.unet).eval()
    assert unet.config.in_channels == 9 and bundle.unet.config.in_channels == 4
    x, extra = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8)
    context = torch.randn(2, 8, bundle.text_encoder.config.hidden_size)
    with torch.no_grad():
        base = bundle.unet(x, 10, encoder_hidden_states=context).sample
        grown = unet(torch.cat([x, extra], dim=1), 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(grown, base)  # the new channels start at zero: no knowledge lost at step 0


def test_the_inpaint_control_feeds_the_inpainting_unet_its_mask_and_masked_latents(with_inpainting, gradient_image,
                                                                                   mask):  # fmt: skip
    b = with_inpainting
    seen: dict[str, list] = {"base": [], "inpainting": []}
    hooks = [b.unet.register_forward_pre_hook(lambda m, a: seen["base"].append(a[0])),
             b.extras[INPAINTING_UNET].register_forward_pre_hook(lambda m, a: seen["inpainting"].append(a[0]))]
    try:
        auto = sample(b, GenerationRequest(prompt="a red circle", steps=3, seed=0),
                      [BlendedInpaint(image=gradient_image, mask=mask)], progress=False)
        assert not seen["base"] and len(seen["inpainting"]) == 3
        x = seen["inpainting"][0]
        assert x.shape[1] == 9
        ctx = Context.create(b, GenerationRequest(), [])
        m = torch.from_numpy(mask > 0).float()[None, None]
        pixels = image_pixels(gradient_image, b.resolution, b.resolution, "image")
        with torch.no_grad():
            expected = inpainting_channels(m, ctx.encode_mean(pixels * (1 - m)))
        for half in x.chunk(2):  # both guidance branches get the channels
            torch.testing.assert_close(half[:, 4:], expected)
        seen["inpainting"].clear()
        base = sample(b, GenerationRequest(prompt="a red circle", steps=3, seed=0),
                      [BlendedInpaint(image=gradient_image, mask=mask, unet="base")], progress=False)
        assert len(seen["base"]) == 3 and not seen["inpainting"] and seen["base"][0].shape[1] == 4
    finally:
        for h in hooks:
            h.remove()
    assert np.array_equal(auto.images[0][mask == 0], gradient_image[mask == 0])  # the outside is pasted back
    assert not np.array_equal(auto.images[0], base.images[0])
    unblended = sample(b, GenerationRequest(prompt="a red circle", steps=3, seed=0),
                       [BlendedInpaint(image=gradient_image, mask=mask, blend=False)], progress=False)
    assert np.array_equal(unblended.images[0][mask == 0], gradient_image[mask == 0])  # pasted back all the same
    assert not torch.equal(unblended.latents, auto.latents)  # the known latents were left to the UNet
    with pytest.raises(InputError, match="blend must be true or false"):
        BlendedInpaint(image=gradient_image, mask=mask, blend="no")
    replay = sample(b, GenerationRequest.from_dict(auto.requests[0].to_dict()), progress=False)
    assert np.array_equal(replay.images[0], auto.images[0])


def test_an_inpainting_unet_asked_for_or_run_without_a_mask_is_a_clear_error(bundle, with_inpainting,
                                                                             gradient_image, mask):  # fmt: skip
    with pytest.raises(InputError, match="mmsynth train inpaint"):
        sample(bundle, GenerationRequest(steps=2), [BlendedInpaint(image=gradient_image, mask=mask,
                                                                   unet="inpainting")], progress=False)  # fmt: skip
    with pytest.raises(InputError, match="unet must be one of auto, inpainting, base"):
        BlendedInpaint(image=gradient_image, mask=mask, unet="sd15")
    inpainting_only = dataclasses.replace(with_inpainting, unet=with_inpainting.extras[INPAINTING_UNET], extras={})
    with pytest.raises(InputError, match=r"takes 9 input channels.*give a mask"):
        sample(inpainting_only, GenerationRequest(steps=2), progress=False)
    out = sample(inpainting_only, GenerationRequest(steps=2), [BlendedInpaint(image=gradient_image, mask=mask)],
                 progress=False)  # a bundle whose own UNet inpaints (e.g. SD inpainting weights) gets the channels
    assert out.images.shape == (1, *gradient_image.shape)


def test_the_inpainting_unet_saves_in_the_bundle_and_loads_in_diffusers_inpaint_pipeline(
        with_inpainting, tmp_path, gradient_image, mask):  # fmt: skip
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from PIL import Image

    with_inpainting.save_pretrained(tmp_path / "b", dtype=torch.float16)
    back = Bundle.from_pretrained(tmp_path / "b")
    unet = back.extras[INPAINTING_UNET]
    assert unet.config.in_channels == 9 and unet.dtype == torch.float32
    ours = sample(back, GenerationRequest(prompt="a red circle", steps=2, seed=0),
                  [BlendedInpaint(image=gradient_image, mask=mask)], progress=False)
    assert ours.images.shape == (1, *gradient_image.shape)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tmp_path / "b", unet=UNet2DConditionModel.from_pretrained(tmp_path / "b", subfolder=INPAINTING_UNET),
        safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)  # fmt: skip
    r = back.resolution
    image = pipe("a red circle", image=Image.fromarray(gradient_image), mask_image=Image.fromarray(mask), height=r,
                 width=r, num_inference_steps=2, output_type="np").images[0]  # fmt: skip
    assert image.shape == gradient_image.shape and np.isfinite(image).all()


def test_training_masks_cover_an_object_a_rectangle_or_everything():
    scene = sample_scene("train", 3, 0)
    objects = [training_mask(scene, 64, np.random.default_rng([0, i]), InpaintOptions(object_masks=1.0,
                                                                                      full_masks=0.0))
               for i in range(20)]  # fmt: skip
    for m in objects:
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0.0, 1.0} and 0 < m.mean() < 1
        # the mask holds one whole object's box
        assert any(m[int(o.box()[1] * 64) + 1: int(o.box()[3] * 64) - 1,
                     int(o.box()[0] * 64) + 1: int(o.box()[2] * 64) - 1].all() for o in scene.objects)  # fmt: skip
    full = training_mask(scene, 64, np.random.default_rng(0), InpaintOptions(object_masks=0.0, full_masks=1.0))
    assert full.all()
    with pytest.raises(InputError, match="sum <= 1"):
        InpaintOptions(object_masks=0.8, full_masks=0.5).validate()


def test_the_recipe_trains_and_exports_a_bundle_whose_unet_inpaints(tmp_path):
    from mmsynth.cli.main import main

    tiny_bundle(seed=1).save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    rc = main(["train", "inpaint", "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--no-progress",
               "--set", f"options.base={tmp_path / 'base'}", "--set", "sample_every=2", "--set", "checkpoint_every=1",
               "--set", "warmup_steps=0", "--set", "lr_schedule=constant", "--set", "options.sample_steps=2",
               "--set", "num_workers=0"])  # fmt: skip
    assert rc == 0
    exported = Bundle.from_pretrained(out / "final")
    assert exported.unet.config.in_channels == 9
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())


def test_the_recipe_refuses_options_it_does_not_use_or_cannot_take():
    from mmsynth.train import get_recipe, load_config

    for key, value, what in [("options.grounding_weight", "0.1", "is for the t2i recipe"),
                             ("options.full_masks", "2", "sum <= 1")]:  # fmt: skip
        with pytest.raises(InputError, match=what):
            load_config(get_recipe("inpaint"), overrides={key: value})
