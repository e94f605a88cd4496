"""GLIGEN as a control: parity with diffusers' StableDiffusionGLIGENPipeline, scheduled sampling, per-image layouts,
clear errors, and the zoo's way of shipping it (the layers over a frozen base UNet, loaded by name)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle, list_components
from mmsynth.models.components import save_layers
from mmsynth.models.zoo import build_gligen_unet
from mmsynth.sample import GenerationRequest, Schedule, make_scheduler, sample
from mmsynth.sample.controls import control_from_dict
from mmsynth.sample.gligen import Gligen

PROMPT = "two red circles left of a blue square"
BOXES = [[0.1, 0.2, 0.4, 0.6], [0.05, 0.6, 0.3, 0.95], [0.5, 0.5, 0.9, 0.9]]
PHRASES = ["red circle", "red circle", "blue square"]
ATOL = 1e-4


def _trained_looking(unet):
    """A gated copy with random grounding layers and open gates (zero gates would make every test vacuous)."""
    g = build_gligen_unet(unet)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.startswith("position_net.") or ".fuser." in name:
                p.fill_(0.7) if p.ndim == 0 else p.normal_(0, 0.3)
    return g.eval()


@pytest.fixture(scope="module")
def with_gligen(bundle):
    return dataclasses.replace(bundle, extras={"gligen": _trained_looking(bundle.unet)})


def _reference(b, beta, n, seed, cfg=4.0, boxes=BOXES, phrases=PHRASES):
    pipe = StableDiffusionGLIGENPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer,
                                         unet=b.extras["gligen"], scheduler=make_scheduler("ddim", b.scheduler),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, gligen_phrases=phrases, gligen_boxes=boxes, gligen_scheduled_sampling_beta=beta,
                num_inference_steps=5, guidance_scale=cfg, num_images_per_prompt=n, output_type="latent",
                generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]).images


@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_gligen_matches_diffusers_gligen_pipeline(with_gligen, beta):
    req = GenerationRequest(prompt=PROMPT, steps=5, cfg=4.0, seed=2, n=2)
    ours = sample(with_gligen, req, [Gligen(boxes=BOXES, phrases=PHRASES, schedule=Schedule(end=beta))],
                  progress=False)
    torch.testing.assert_close(ours.latents, _reference(with_gligen, beta, 2, 2), atol=ATOL, rtol=1e-3)
    plain = sample(with_gligen, req, progress=False)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)


def test_grounding_acts_only_on_the_first_fraction_of_the_steps(with_gligen):
    """After scheduled sampling's beta the gated layers are skipped: the UNet is the base again."""
    calls = []
    unet = with_gligen.extras["gligen"]
    handle = unet.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw.get("cross_attention_kwargs") or {}).get("gligen") is not None),
        with_kwargs=True)
    try:
        sample(with_gligen, GenerationRequest(prompt=PROMPT, steps=10, cfg=4.0, seed=0),
               [Gligen(boxes=BOXES, phrases=PHRASES)], progress=False)
    finally:
        handle.remove()
    assert calls == [True] * 3 + [False] * 7  # default beta 0.3 of 10 steps, one batched call per step


def test_a_fresh_gated_copy_computes_what_the_base_does(bundle):
    g = build_gligen_unet(bundle.unet)
    ext = dataclasses.replace(bundle, extras={"gligen": g})
    req = GenerationRequest(prompt=PROMPT, steps=3, seed=1)
    torch.testing.assert_close(sample(ext, req, [Gligen(boxes=BOXES, phrases=PHRASES, schedule=Schedule(end=1.0))],
                                      progress=False).latents, sample(bundle, req, progress=False).latents)


def test_per_image_layouts_match_one_image_runs(with_gligen):
    other = [[0.6, 0.1, 0.95, 0.4]]
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=5, n=2)
    both = sample(with_gligen, req, [Gligen(boxes=[BOXES, other], phrases=[PHRASES, ["green star"]])],
                  progress=False)
    second = sample(with_gligen, dataclasses.replace(req, n=1, seed=6),
                    [Gligen(boxes=other, phrases=["green star"])], progress=False)
    torch.testing.assert_close(both.latents[1:], second.latents, atol=ATOL, rtol=1e-3)


def test_a_request_with_gligen_replays_from_json(with_gligen):
    req = GenerationRequest(prompt=PROMPT, steps=3, seed=4)
    first = sample(with_gligen, req, [Gligen(boxes=BOXES, phrases=PHRASES)], progress=False)
    saved = json.loads(json.dumps(first.requests[0].to_dict()))
    assert saved["controls"][0]["name"] == "gligen" and saved["controls"][0]["schedule"]["end"] == 0.3
    again = sample(with_gligen, GenerationRequest.from_dict(saved), progress=False)
    torch.testing.assert_close(first.latents, again.latents)


@pytest.mark.parametrize("kwargs,message", [
    ({"boxes": [[0.5, 0.1, 0.4, 0.3]], "phrases": ["red circle"]}, "x0 < x1"),
    ({"boxes": [[0.1, 0.1, 0.4, 1.3]], "phrases": ["red circle"]}, "<= 1"),
    ({"boxes": [[0.1, 0.1, 0.4, 0.3]], "phrases": [" "]}, "non-empty"),
    ({"boxes": [[0.1, 0.1, 0.4, 0.3]] * 31, "phrases": ["red circle"] * 31}, "at most 30"),
    ({"boxes": BOXES, "phrases": PHRASES[:2]}, "one phrase per box"),
])
def test_bad_layouts_are_one_line_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        control_from_dict({"name": "gligen", **kwargs})


def test_a_model_without_grounding_layers_names_the_guidance_methods(bundle, with_gligen):
    req = GenerationRequest(prompt=PROMPT, steps=2)
    with pytest.raises(InputError, match="layout-guidance"):
        sample(bundle, req, [Gligen(boxes=BOXES, phrases=PHRASES)], progress=False)
    with pytest.raises(InputError, match="no grounding layers"):
        sample(with_gligen, req, [Gligen(boxes=BOXES, phrases=PHRASES, model="unet")], progress=False)


def test_the_layers_ship_alone_and_load_by_name(bundle, tmp_path):
    """Only the layers the base lacks are saved; the bundle loads them over its own unet, and diffusers' plain
    from_pretrained of the folder refuses it rather than running half-initialised."""
    g = _trained_looking(bundle.unet)
    root = bundle.save_pretrained(tmp_path / "m")
    entry = save_layers(g, bundle.unet, root / "gligen", "unet", dtype=torch.float32)
    list_components(root, {"gligen": entry})
    manifest = json.loads((root / "mmsynth_components.json").read_text())
    assert manifest["components"]["gligen"] == {"library": "diffusers", "class": "UNet2DConditionModel",
                                                "base": "unet"}
    stored = load_file(root / "gligen" / "layers.safetensors")
    assert sorted(stored) == sorted(k for k in g.state_dict() if k.startswith("position_net.") or ".fuser." in k)
    loaded = Bundle.from_pretrained(root).extras["gligen"]
    for k, v in g.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        UNet2DConditionModel.from_pretrained(root, subfolder="gligen")


def test_layers_over_another_base_are_refused(bundle, tmp_path):
    root = bundle.save_pretrained(tmp_path / "m")
    list_components(root, {"gligen": save_layers(_trained_looking(bundle.unet), bundle.unet, root / "gligen", "unet")})
    UNet2DConditionModel.from_config(bundle.unet.config, cross_attention_dim=16).save_pretrained(root / "unet")
    with pytest.raises(InputError, match="component 'gligen'"):
        Bundle.from_pretrained(root).extras["gligen"]


def test_gligen_composes_with_a_controlnet_and_blended_inpainting_in_one_call(with_gligen, gradient_image):
    """GLIGEN boxes + a ControlNet's edges + an inpainting mask: one request, the outside kept, each control acting."""
    import numpy as np

    from mmsynth.models.zoo import build_controlnet
    from mmsynth.sample import BlendedInpaint, ControlNet

    torch.manual_seed(1)
    cn = build_controlnet(with_gligen.unet, with_gligen.vae_scale_factor)
    with torch.no_grad():
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    b = dataclasses.replace(with_gligen, extras={"gligen": with_gligen.extras["gligen"], "cn": cn.eval()})
    r = b.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[4:28, 4:28] = 255
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=1)
    inpaint = BlendedInpaint(image=gradient_image, mask=mask, unet="base")
    control = ControlNet(model="cn", image=gradient_image, annotate="canny")
    grounded = Gligen(boxes=BOXES, phrases=PHRASES, schedule=Schedule(end=1.0))
    every = sample(b, req, [inpaint, control, grounded], progress=False).images[0]
    outside = mask == 0
    assert np.array_equal(every[outside], gradient_image[outside])
    for fewer in ([inpaint, control], [inpaint, grounded]):
        assert not np.array_equal(sample(b, req, fewer, progress=False).images[0][~outside], every[~outside])
