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
