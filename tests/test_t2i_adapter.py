"""The t2i-adapter control: parity with diffusers' StableDiffusionAdapterPipeline (single and MultiAdapter), features
computed once, start/end (cond_tau), region mask, replay, and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import MultiAdapter, StableDiffusionAdapterPipeline
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.models.zoo import TINY, build_adapter, random_bundle
from mmsynth.sample import GenerationRequest, Schedule, T2IAdapterControl, make_scheduler, sample

PROMPT = "a red circle above a blue square"
ATOL = 1e-4


@pytest.fixture(scope="module")
def adapted():
    """A tiny bundle whose UNet has cross-attention in every down block (where diffusers adds adapter features),
    carrying a 3-channel and a 1-channel random adapter."""
    b = random_bundle(dataclasses.replace(TINY, unet_cross_attention_levels=(True, True, True)), seed=0)
    torch.manual_seed(3)
    rgb = build_adapter(b.unet, b.vae_scale_factor).eval()
    grey = build_adapter(b.unet, b.vae_scale_factor, in_channels=1).eval()
    return dataclasses.replace(b, extras={"adapter_palette": rgb, "adapter_sketch": grey})


@pytest.fixture(scope="module")
def cond(adapted):
    r = adapted.resolution
    img = np.zeros((r, r, 3), np.uint8)
    img[4:16, 6:20] = (230, 40, 40)
    img[18:30, 14:28] = (30, 60, 220)
    return img


@pytest.fixture(scope="module")
def sketch(adapted):
    r = adapted.resolution
    img = np.zeros((r, r), np.uint8)
    img[8, 4:28] = 255
    img[4:28, 20] = 255
    return img


def _pipe(b, adapter):
    pipe = StableDiffusionAdapterPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                          adapter=adapter, scheduler=make_scheduler("ddim", b.scheduler),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _copy(features):
    """What the UNet was given (it pops from the list as it goes)."""
    return None if features is None else list(features)


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_one_adapter_matches_diffusers(adapted, cond, scale):
    req = GenerationRequest(prompt=PROMPT, steps=4, cfg=4.0, seed=2, n=2)
    ours = sample(adapted, req, [T2IAdapterControl(model="adapter_palette", image=cond,
                                                   schedule=Schedule(scale=scale))], progress=False)  # fmt: skip
    r = adapted.resolution
    ref = _pipe(adapted, adapted.extras["adapter_palette"])(
        PROMPT, image=Image.fromarray(cond), height=r, width=r, num_inference_steps=4, guidance_scale=4.0,
        num_images_per_prompt=2, generator=_gens(2, 2), output_type="latent",
        adapter_conditioning_scale=scale).images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)
    assert not torch.allclose(ours.latents, sample(adapted, req, progress=False).latents, atol=1e-3)


def test_two_adapters_match_diffusers_multiadapter(adapted, cond, sketch):
    controls = [T2IAdapterControl(model="adapter_palette", image=cond, schedule=Schedule(scale=0.7)),
                T2IAdapterControl(model="adapter_sketch", image=sketch, schedule=Schedule(scale=0.4))]
    req = GenerationRequest(prompt=PROMPT, steps=4, cfg=3.0, seed=4)
    ours = sample(adapted, req, controls, progress=False)
    multi = MultiAdapter([adapted.extras["adapter_palette"], adapted.extras["adapter_sketch"]])
    r = adapted.resolution
    ref = _pipe(adapted, multi)(
        PROMPT, image=[Image.fromarray(cond), Image.fromarray(sketch)], height=r, width=r, num_inference_steps=4,
        guidance_scale=3.0, generator=_gens(4, 1), output_type="latent", adapter_conditioning_scale=[0.7, 0.4]).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def test_features_are_computed_once_and_given_to_both_branches(adapted, cond):
    calls, seen = [], []
    adapter = adapted.extras["adapter_palette"]
    hooks = [adapter.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape)),
             adapted.unet.register_forward_pre_hook(
                 lambda m, a, kw: seen.append(_copy(kw.get("down_intrablock_additional_residuals"))), with_kwargs=True)]
    try:
        sample(adapted, GenerationRequest(prompt=PROMPT, steps=4, cfg=4.0, seed=0, n=2),
               [T2IAdapterControl(model="adapter_palette", image=cond, schedule=Schedule(end=0.5))], progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 1 and calls[0][0] == 1  # once per sampling, on the one condition
    assert [s is not None for s in seen] == [True, True, False, False]  # end 0.5 (cond_tau): the first half only
    first = seen[0][0]
    assert first.shape[0] == 4  # 2 branches x 2 images, the same features on both branches
    torch.testing.assert_close(first[:2], first[2:])


def test_region_mask_and_replay(adapted, cond):
    r = adapted.resolution
    region = np.zeros((r, r), np.uint8)
    region[: r // 2] = 255
    seen = []
    h = adapted.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(_copy(kw.get("down_intrablock_additional_residuals"))), with_kwargs=True)
    try:
        out = sample(adapted, GenerationRequest(prompt=PROMPT, steps=2, seed=1),
                     [T2IAdapterControl(model="adapter_palette", image=cond, schedule=Schedule(mask=region))],
                     progress=False)  # fmt: skip
    finally:
        h.remove()
    for f in seen[0]:
        assert float(f[..., f.shape[-2] // 2:, :].abs().max()) == 0.0 and float(f.abs().max()) > 0
    replay = sample(adapted, GenerationRequest.from_dict(out.requests[0].to_dict()), progress=False)
    assert np.array_equal(replay.images, out.images)


def test_a_colour_condition_for_a_grey_adapter_is_converted(adapted, cond):
    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0)
    from_rgb = sample(adapted, req, [T2IAdapterControl(model="adapter_sketch", image=cond)], progress=False)
    grey = np.asarray(Image.fromarray(cond).convert("L"))
    from_grey = sample(adapted, req, [T2IAdapterControl(model="adapter_sketch", image=grey)], progress=False)
    torch.testing.assert_close(from_rgb.latents, from_grey.latents)
    annotated = sample(adapted, req, [T2IAdapterControl(model="adapter_sketch", image=cond, annotate="xdog")],
                       progress=False)
    assert not torch.allclose(annotated.latents, from_rgb.latents)


def test_an_adapter_for_another_base_is_refused_plainly(bundle, adapted, cond):
    b = dataclasses.replace(bundle, extras={"adapter_palette": adapted.extras["adapter_palette"]})
    with pytest.raises(InputError, match="every down block but the last needs cross-attention"):
        sample(b, GenerationRequest(steps=1), [T2IAdapterControl(model="adapter_palette", image=cond)],
               progress=False)
    wide = build_adapter(random_bundle(dataclasses.replace(TINY, unet_channels=(16, 32, 64),
                                                           unet_cross_attention_levels=(True, True, True))).unet, 4)
    b = dataclasses.replace(adapted, extras={"adapter_wide": wide})
    with pytest.raises(InputError, match=r"T2I-Adapter 'adapter_wide' was built for another base \(channels "
                                         r"\(16, 32, 64\); this model's is \(16, 32, 32\)\)"):
        sample(b, GenerationRequest(steps=1), [T2IAdapterControl(model="adapter_wide", image=cond)], progress=False)
    with pytest.raises(InputError, match="is a T2IAdapter, not a ControlNetModel"):
        from mmsynth.sample import ControlNet

        sample(adapted, GenerationRequest(steps=1), [ControlNet(model="adapter_palette", image=cond)], progress=False)
    with pytest.raises(InputError, match=r"schedule\.scale must be >= 0"):
        T2IAdapterControl(model="adapter_palette", image=cond, schedule=Schedule(scale=[1.0, -1.0, 1.0]))
