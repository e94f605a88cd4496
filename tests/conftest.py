"""Shared test set-up: single-threaded torch (2-core CI machine), no hub access."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle():
    """A random tiny text-to-image bundle (one per test module, so hooks a module installs stay in it)."""
    from mmsynth.models.zoo import tiny_bundle

    return tiny_bundle(seed=0)


@pytest.fixture(scope="module")
def gradient_image(bundle):
    """A smooth, non-constant RGB picture at the bundle's resolution."""
    r = bundle.resolution
    yy, xx = np.mgrid[0:r, 0:r]
    img = np.stack([xx * 255 // (r - 1), yy * 255 // (r - 1), (xx + yy) * 127 // (r - 1)], axis=-1)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def gradient_latents(bundle, gradient_image):
    """The VAE latent mean of gradient_image (z_0 of its DDIM inversion)."""
    from mmsynth.sample import GenerationRequest
    from mmsynth.sample.inversion import image_pixels
    from mmsynth.sample.sampler import Context

    ctx = Context.create(bundle, GenerationRequest(cfg=1.0), [])
    r = bundle.resolution
    with torch.no_grad():
        return ctx.encode_mean(image_pixels(gradient_image, r, r, "image"))


@pytest.fixture(scope="session")
def control_model_dir(tmp_path_factory):
    """A saved tiny bundle (cross-attention in every down block, as adapters need) carrying a random ControlNet and a
    1-channel T2I-Adapter as the components `controlnet_canny` and `adapter_depth` (what `--control` resolves)."""
    import dataclasses

    from mmsynth.models.zoo import TINY, build_adapter, build_controlnet, random_bundle

    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), seed=0)
    torch.manual_seed(1)
    cn = build_controlnet(b.unet, b.vae_scale_factor)
    with torch.no_grad():  # the zero convolutions would make the control a no-op
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    adapter = build_adapter(b.unet, b.vae_scale_factor, in_channels=1)
    b = dataclasses.replace(b, extras={"controlnet_canny": cn, "adapter_depth": adapter})
    return b.save_pretrained(tmp_path_factory.mktemp("models") / "controls")
