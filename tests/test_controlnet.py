"""The controlnet control: parity with diffusers' ControlNet pipelines (single, multi, img2img, inpainting), its
control modes, guess mode, schedule, region mask, replay, composition, and bad input."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.models.bundle import INPAINTING_UNET
from mmsynth.models.zoo import TINY, build_controlnet, build_unet
from mmsynth.sample import (
    BlendedInpaint,
    ControlNet,
    GenerationRequest,
    Img2Img,
    InvertedLatents,
    Schedule,
    UniversalGuidance,
    control_from_dict,
    make_scheduler,
    sample,
)
from mmsynth.sample.controlnet import mode_weights

PROMPT = "two red circles left of a blue square"
ATOL = 1e-4  # float32 parity on latents


def _controlnet(bundle, seed):
    torch.manual_seed(seed)
    cn = build_controlnet(bundle.unet, bundle.vae_scale_factor)
    with torch.no_grad():  # the zero convolutions would make every test vacuous
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    return cn.eval()


@pytest.fixture(scope="module")
def with_cn(bundle):
    """The tiny bundle carrying two random ControlNets as components."""
    return dataclasses.replace(bundle, extras={"controlnet_a": _controlnet(bundle, 1),
                                               "controlnet_b": _controlnet(bundle, 2)})


def _condition(r, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((r, r, 3), np.uint8)
    for _ in range(3):
        y, x, s = rng.integers(0, r - 8, 3)
        img[y:y + 8 + s % 8, x:x + 8 + s % 8] = rng.integers(0, 256, 3)
    return img


@pytest.fixture(scope="module")
def cond_a(bundle):
    return _condition(bundle.resolution, 0)


@pytest.fixture(scope="module")
def cond_b(bundle):
    return _condition(bundle.resolution, 1)


def _pipe(cls, b, **extra):
    pipe = cls(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=extra.pop("unet", b.unet),
               scheduler=make_scheduler("ddim", b.scheduler), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("guess_mode,scale,start,end", [(False, 0.7, 0.0, 1.0), (False, 1.3, 0.2, 0.8),
                                                        (True, 0.8, 0.0, 0.6)])
def test_one_controlnet_matches_diffusers(with_cn, cond_a, guess_mode, scale, start, end):
    control = ControlNet(model="controlnet_a", image=cond_a, guess_mode=guess_mode,
                         schedule=Schedule(scale=scale, start=start, end=end))
    req = GenerationRequest(prompt=PROMPT, steps=5, cfg=4.0, seed=2, n=2)
    ours = sample(with_cn, req, [control], progress=False)
    pipe = _pipe(StableDiffusionControlNetPipeline, with_cn, controlnet=with_cn.extras["controlnet_a"])
    ref = pipe(PROMPT, image=Image.fromarray(cond_a), num_inference_steps=5, guidance_scale=4.0,
               num_images_per_prompt=2, generator=_gens(2, 2), output_type="latent", guess_mode=guess_mode,
               controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)
    plain = sample(with_cn, req, progress=False)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)


def test_two_controlnets_match_diffusers_multicontrolnet(with_cn, cond_a, cond_b):
    controls = [ControlNet(model="controlnet_a", image=cond_a, schedule=Schedule(scale=0.6)),
                ControlNet(model="controlnet_b", image=cond_b, schedule=Schedule(scale=0.9, start=0.2, end=0.8))]
    req = GenerationRequest(prompt=PROMPT, steps=5, cfg=3.0, seed=5)
    ours = sample(with_cn, req, controls, progress=False)
    nets = [with_cn.extras["controlnet_a"], with_cn.extras["controlnet_b"]]
    pipe = _pipe(StableDiffusionControlNetPipeline, with_cn, controlnet=nets)
    ref = pipe(PROMPT, image=[Image.fromarray(cond_a), Image.fromarray(cond_b)], num_inference_steps=5,
               guidance_scale=3.0, generator=_gens(5, 1), output_type="latent",
               controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.2],
               control_guidance_end=[1.0, 0.8]).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def test_controlnet_with_img2img_matches_diffusers(with_cn, cond_a, gradient_image):
    req = GenerationRequest(prompt=PROMPT, steps=5, cfg=4.0, seed=3)
    ours = sample(with_cn, req, [Img2Img(image=gradient_image, strength=0.6),
                                 ControlNet(model="controlnet_a", image=cond_a, schedule=Schedule(scale=0.8))],
                  progress=False)
    pipe = _pipe(StableDiffusionControlNetImg2ImgPipeline, with_cn, controlnet=with_cn.extras["controlnet_a"])
    ref = pipe(PROMPT, image=Image.fromarray(gradient_image), control_image=Image.fromarray(cond_a), strength=0.6,
               num_inference_steps=5, guidance_scale=4.0, generator=_gens(3, 1), output_type="latent",
               controlnet_conditioning_scale=0.8).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


@pytest.fixture(scope="module")
def mask(bundle):
    r = bundle.resolution
    m = np.zeros((r, r), np.uint8)
    m[6:22, 8:26] = 255
    return m


def test_controlnet_with_the_inpainting_unet_matches_diffusers(with_cn, cond_a, gradient_image, mask):
    """diffusers' ControlNet inpainting pipeline with a 9-channel UNet = the inpaint control with blend and paste-back
    off (diffusers neither blends for that UNet nor pastes back by default). mmsynth encodes the masked image's
    posterior MEAN (deterministic), diffusers samples it: on a VAE whose posterior variance is negligible they agree.
    (This pipeline's controlnet_conditioning_scale defaults to 0.5, not 1.0: given explicitly.)"""
    from mmsynth.train.recipes.inpaint import inpainting_unet

    unet9 = inpainting_unet(with_cn.unet)
    with torch.no_grad():
        unet9.conv_in.weight[:, 4:] = 0.3 * torch.randn_like(unet9.conv_in.weight[:, 4:])
    vae = _near_deterministic(with_cn.vae)
    b = dataclasses.replace(with_cn, vae=vae, extras={**dict(with_cn.extras.items()), INPAINTING_UNET: unet9.eval()})
    req = GenerationRequest(prompt=PROMPT, steps=4, cfg=4.0, seed=1)
    ours = sample(b, req, [BlendedInpaint(image=gradient_image, mask=mask, blend=False, paste=False),
                           ControlNet(model="controlnet_a", image=cond_a, schedule=Schedule(scale=0.8))],
                  progress=False)
    pipe = _pipe(StableDiffusionControlNetInpaintPipeline, b, unet=unet9, controlnet=b.extras["controlnet_a"])
    r = b.resolution
    ref = pipe(PROMPT, image=Image.fromarray(gradient_image), mask_image=Image.fromarray(mask),
               control_image=Image.fromarray(cond_a), height=r, width=r, num_inference_steps=4, guidance_scale=4.0,
               generator=_gens(1, 1), output_type="latent", controlnet_conditioning_scale=0.8).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def _near_deterministic(vae):
    """A copy of the VAE whose posterior log-variance is clamped to its floor (std ~ 3e-7): sample == mean."""
    import copy

    vae = copy.deepcopy(vae)
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -100.0
    return vae


def test_controlnet_with_blended_inpainting_keeps_the_outside_and_changes_the_inside(with_cn, cond_a, gradient_image,
                                                                                     mask):  # fmt: skip
    """The 4-channel path differs from diffusers' legacy blend by design (mmsynth re-noises the source's posterior
    mean with fresh noise each step and pastes the known pixels back): its documented behaviour is tested."""
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=1)
    inpaint = BlendedInpaint(image=gradient_image, mask=mask, unet="base")
    with_control = sample(with_cn, req, [inpaint, ControlNet(model="controlnet_a", image=cond_a)], progress=False)
    without = sample(with_cn, req, [inpaint], progress=False)
    outside = mask == 0
    assert np.array_equal(with_control.images[0][outside], gradient_image[outside])
    assert not np.array_equal(with_control.images[0][~outside], without.images[0][~outside])


# ---------------------------------------------------------------------------------------------- modes and weights
def _residuals(b, req, controls):
    """The residuals the UNet received at each call (down list + mid)."""
    seen = []

    def hook(module, args, kwargs):
        down = kwargs.get("down_block_additional_residuals")
        if down is not None:
            seen.append([*down, kwargs["mid_block_additional_residual"]])

    h = b.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(b, req, controls, progress=False)
    finally:
        h.remove()
    return seen


def test_modes_and_guess_mode_weight_each_residual(with_cn, cond_a):
    req = GenerationRequest(prompt=PROMPT, steps=2, cfg=4.0, seed=0)
    balanced = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a)])
    n = len(balanced[0])
    assert n == len(with_cn.extras["controlnet_a"].controlnet_down_blocks) + 1
    prompt = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a, mode="prompt")])
    weights = mode_weights("prompt", n)
    assert weights[-1] == 1.0 and weights[0] == pytest.approx(0.825 ** (n - 1))
    for b, p, w in zip(balanced[0], prompt[0], weights):  # both branches, residual i scaled by 0.825 ** (n - 1 - i)
        torch.testing.assert_close(p, b * w)
    control = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a, mode="control")])
    for b, c in zip(balanced[0], control[0]):  # the conditional branch only (the batch is [uncond, cond])
        assert float(c[:1].abs().max()) == 0.0
        torch.testing.assert_close(c[1:], b[1:])
    guess = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a, guess_mode=True,
                                                 schedule=Schedule(scale=0.5))])  # fmt: skip
    for b, g, w in zip(balanced[0], guess[0], torch.logspace(-1, 0, n).tolist()):
        assert float(g[:1].abs().max()) == 0.0
        torch.testing.assert_close(g[1:], b[1:] * w * 0.5)
    per_residual = [0.1 * i for i in range(n)]
    listed = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a, mode="prompt",
                                                  schedule=Schedule(scale=per_residual))])  # fmt: skip
    for b, x, w, s in zip(balanced[0], listed[0], weights, per_residual):  # scale_i * mode_i
        torch.testing.assert_close(x, b * w * s)


def test_region_mask_zeroes_the_residuals_outside(with_cn, cond_a):
    r = with_cn.resolution
    region = np.zeros((r, r), np.uint8)
    region[:, : r // 2] = 255  # left half
    req = GenerationRequest(prompt=PROMPT, steps=2, cfg=4.0, seed=0)
    full = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a)])
    masked = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a, schedule=Schedule(mask=region))])
    for f, m in zip(full[0], masked[0]):
        w = m.shape[-1]
        if w > 1:
            assert float(m[..., w // 2:].abs().max()) == 0.0
        torch.testing.assert_close(m[..., : max(1, w // 2)], f[..., : max(1, w // 2)])


def test_start_end_limit_the_steps_with_residuals(with_cn, cond_a):
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=0)
    seen = _residuals(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a,
                                                schedule=Schedule(start=0.25, end=0.75))])  # fmt: skip
    assert len(seen) == 2  # steps 1 and 2 of 4


def test_the_controlnet_runs_once_per_step_for_both_branches(with_cn, cond_a):
    calls = []
    net = with_cn.extras["controlnet_a"]
    h = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        sample(with_cn, GenerationRequest(prompt=PROMPT, steps=3, cfg=4.0, n=2), [ControlNet(model="controlnet_a",
                                                                                              image=cond_a)],
               progress=False)  # fmt: skip
    finally:
        h.remove()
    assert calls == [4, 4, 4]  # one call per step, batch = 2 branches x 2 images


# ---------------------------------------------------------------------------------------------- replay and composition
def test_a_request_with_controlnets_replays_from_json(with_cn, cond_a, cond_b):
    r = with_cn.resolution
    region = np.zeros((r, r), np.uint8)
    region[4:20] = 255
    controls = [ControlNet(model="controlnet_a", image=cond_a, mode="prompt", schedule=Schedule(scale=0.8, end=0.8)),
                ControlNet(model="controlnet_b", image=cond_b, annotate="canny", guess_mode=True,
                           schedule=Schedule(mask=region))]
    out = sample(with_cn, GenerationRequest(prompt=PROMPT, steps=3, seed=7), controls, progress=False)
    d = out.requests[0].to_dict()
    assert [c["name"] for c in d["controls"]] == ["controlnet", "controlnet"]
    assert d["controls"][1]["schedule"]["branch"] == "cond" and d["controls"][1]["annotate"] == "canny"
    replay = sample(with_cn, GenerationRequest.from_dict(d), progress=False)
    assert np.array_equal(replay.images, out.images)


def test_per_image_conditions(with_cn, cond_a, cond_b):
    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0, n=2)
    both = sample(with_cn, req, [ControlNet(model="controlnet_a", image=[cond_a, cond_b])], progress=False)
    first = sample(with_cn, dataclasses.replace(req, n=1), [ControlNet(model="controlnet_a", image=cond_a)],
                   progress=False)
    torch.testing.assert_close(both.latents[:1], first.latents, atol=ATOL, rtol=1e-3)
    replay = sample(with_cn, GenerationRequest.from_dict(both.requests[1].to_dict()), progress=False)
    assert replay.images.shape[0] == 1
    with pytest.raises(InputError, match="3 images for a batch of 2"):
        sample(with_cn, req, [ControlNet(model="controlnet_a", image=[cond_a, cond_b, cond_a])], progress=False)


def test_controlnet_composes_with_universal_guidance_and_inversion(with_cn, cond_a, gradient_image):
    req = GenerationRequest(prompt=PROMPT, steps=3, seed=0)
    guided = sample(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a),
                                   UniversalGuidance(guide="palette", params={"target": cond_a}, s0=2.0)],
                    progress=False)
    assert np.isfinite(guided.latents.numpy()).all()
    edited = sample(with_cn, req, [InvertedLatents(image=gradient_image, source_prompt="a red circle"),
                                   ControlNet(model="controlnet_a", image=cond_a)], progress=False)
    assert edited.images.shape == (1, *gradient_image.shape)


# ---------------------------------------------------------------------------------------------- bad input
def test_a_condition_of_another_size_is_resized_with_a_warning(with_cn, cond_a, caplog):
    r = with_cn.resolution
    big = np.asarray(Image.fromarray(cond_a).resize((2 * r, 3 * r), Image.NEAREST))
    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0)
    with caplog.at_level(logging.WARNING, logger="mmsynth.sample.spatial"):
        out = sample(with_cn, req, [ControlNet(model="controlnet_a", image=big)], progress=False)
    assert f"is {2 * r}x{3 * r}; resized to the output's {r}x{r}" in caplog.text
    resized = np.asarray(Image.fromarray(big).resize((r, r), Image.LANCZOS))
    same = sample(with_cn, req, [ControlNet(model="controlnet_a", image=resized)], progress=False)
    torch.testing.assert_close(out.latents, same.latents)


def test_grey_and_rgba_conditions_are_converted(with_cn, cond_a):
    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0)
    grey = cond_a[..., 0]
    from_grey = sample(with_cn, req, [ControlNet(model="controlnet_a", image=grey)], progress=False)
    from_rgb = sample(with_cn, req, [ControlNet(model="controlnet_a", image=np.repeat(grey[..., None], 3, 2))],
                      progress=False)
    torch.testing.assert_close(from_grey.latents, from_rgb.latents)
    rgba = np.concatenate([cond_a, np.full((*cond_a.shape[:2], 1), 255, np.uint8)], axis=2)
    from_rgba = sample(with_cn, req, [ControlNet(model="controlnet_a", image=rgba)], progress=False)
    plain = sample(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a)], progress=False)
    torch.testing.assert_close(from_rgba.latents, plain.latents)
    with pytest.raises(InputError, match="controlnet image must be a uint8 image, got dtype float32"):
        ControlNet(model="controlnet_a", image=cond_a.astype(np.float32))
    with pytest.raises(InputError, match=r"must be an HxW, HxWx3 or HxWx4 image, got shape \(32, 32, 2\)"):
        ControlNet(model="controlnet_a", image=cond_a[..., :2])


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "loud"}, "unknown mode 'loud'; valid: balanced, prompt, control"),
    ({"schedule": {"scale": -0.5}}, "schedule.scale must be >= 0"),
    ({"schedule": {"start": 0.6, "end": 0.6}}, "0 <= start < end <= 1"),
    ({"guess_mode": True, "schedule": {"branch": "uncond"}}, "guess mode acts on the conditional branch"),
    ({"annotate": "sonar"}, "unknown annotator kind 'sonar'"),
    ({"model": ""}, "model must be a component name"),
    ({"guess_mode": "yes"}, "guess_mode must be true or false"),
])
def test_bad_options_are_one_line_errors(cond_a, kwargs, message):
    d = {"name": "controlnet", "model": "controlnet_a", "image": cond_a, **kwargs}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        control_from_dict(d)
    assert "\n" not in str(err.value)


def test_an_unknown_model_lists_the_components(with_cn, cond_a):
    with pytest.raises(InputError, match="its components: controlnet_a, controlnet_b"):
        sample(with_cn, GenerationRequest(steps=1), [ControlNet(model="controlnet_seg", image=cond_a)],
               progress=False)


def test_a_controlnet_for_another_base_is_refused_plainly(bundle, cond_a):
    other_spec = dataclasses.replace(TINY, unet_channels=(16, 32, 64))
    other = build_controlnet(build_unet(other_spec, cross_attention_dim=TINY.text_width), 4)
    b = dataclasses.replace(bundle, extras={"controlnet_other": other})
    with pytest.raises(InputError, match=r"ControlNet 'controlnet_other' was built for another base "
                                         r"\(block_out_channels \(16, 32, 64\); this model's is \(16, 32, 32\)\)"):
        sample(b, GenerationRequest(steps=1), [ControlNet(model="controlnet_other", image=cond_a)], progress=False)
    factor8 = build_controlnet(bundle.unet, 8)
    b = dataclasses.replace(bundle, extras={"controlnet_x8": factor8})
    with pytest.raises(InputError, match=r"condition downsampling \(VAE factor\) 8; this model's is 4"):
        sample(b, GenerationRequest(steps=1), [ControlNet(model="controlnet_x8", image=cond_a)], progress=False)


def test_a_controlnet_from_a_directory_loads_once(with_cn, cond_a, tmp_path):
    from mmsynth.sample import spatial

    with_cn.extras["controlnet_a"].save_pretrained(tmp_path / "cn")
    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0)
    spatial._load.cache_clear()
    from_dir = sample(with_cn, req, [ControlNet(model=str(tmp_path / "cn"), image=cond_a)], progress=False)
    sample(with_cn, req, [ControlNet(model=str(tmp_path / "cn"), image=cond_a)], progress=False)
    assert spatial._load.cache_info().misses == 1
    named = sample(with_cn, req, [ControlNet(model="controlnet_a", image=cond_a)], progress=False)
    torch.testing.assert_close(from_dir.latents, named.latents)
