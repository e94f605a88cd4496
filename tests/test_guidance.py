"""Universal guidance through the one sampler: gradients through UNet and decoder, the eps terms, recurrence, guides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from mmsynth.errors import InputError
from mmsynth.evaluate.fidelity import psnr
from mmsynth.models.zoo import tiny_bundle
from mmsynth.sample import (
    BlendedInpaint,
    GenerationRequest,
    Img2Img,
    Schedule,
    UniversalGuidance,
    build_guide,
    control_from_dict,
    guide_names,
    sample,
)
from mmsynth.sample.guides import BoxGuide, PaletteGuide, RegionGuide, guide_loss
from mmsynth.sample.sampler import Context, guidance_branches

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def target(bundle):
    """A red target picture: the palette guide pulls towards it."""
    r = bundle.resolution
    img = np.zeros((r, r, 3), np.uint8)
    img[..., 0], img[..., 2] = 230, 40
    return img


def _palette(target, **kw):
    return UniversalGuidance(guide="palette", params={"target": target}, **kw)


def _loss(guide, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return guide(x).numpy()


def _ctx(bundle, control, **req):
    request = GenerationRequest(**{"prompt": PROMPT, "steps": 4, "cfg": 3.0, "n": 2, **req})
    ctx = Context.create(bundle, request, [control])
    control.prepare(ctx)
    ctx.latents = ctx.noise()
    return ctx


# ---------------------------------------------------------------------------------------------- gradients
def test_forward_gradient_flows_through_the_cfg_unet_and_the_decoder(bundle, target):
    """Fails if the prediction or the decoding were detached, or if guidance used one branch only."""
    seen: dict[str, list[int]] = {"unet": [], "decoder": []}

    def watch(name):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda g: seen[name].append(output.shape[0]))
        return hook

    handles = [bundle.unet.conv_out.register_forward_hook(watch("unet")),
               bundle.vae.decoder.conv_out.register_forward_hook(watch("decoder"))]
    try:
        ug = _palette(target, s0=1.0)
        ctx = _ctx(bundle, ug)
        step = ctx.make_step(0)
        grad = ug.forward_gradient(ctx, step, ctx.latents)
    finally:
        for h in handles:
            h.remove()
    assert seen["unet"] == [4]  # one batched call: uncond + cond for both images, gradients flowed back through it
    assert seen["decoder"] == [2]
    assert grad.shape == ctx.latents.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_forward_guidance_is_the_paper_formula_and_lowers_the_loss_of_x0_hat(bundle, target):
    ug = _palette(target, s0=2.0)
    ctx = _ctx(bundle, ug)
    step = ctx.make_step(1)
    z = ctx.latents
    eps = ctx.predict(z, step)
    guided = ug.after(ctx, step, z, eps)
    grad = ug.forward_gradient(ctx, step, z)
    torch.testing.assert_close(guided - eps, 2.0 * math.sqrt(1 - step.alpha_bar) * grad)

    def loss_of(e):
        return guide_loss(ug._guide, ctx.decode(step.to_x0(z, e, "epsilon"))).item()

    assert loss_of(guided) < loss_of(eps)


def test_backward_guidance_maps_delta_into_eps_and_lowers_the_loss(bundle, target):
    ug = _palette(target, s0=0.0, m=4, lr=0.1)
    ctx = _ctx(bundle, ug)
    step = ctx.make_step(1)
    z = ctx.latents
    eps = ctx.predict(z, step)
    x0 = step.to_x0(z, eps, "epsilon")
    delta = ug.backward_delta(ctx, x0)
    guided = ug.after(ctx, step, z, eps)  # same Delta: Adam from zero is deterministic
    torch.testing.assert_close(step.to_x0(z, guided, "epsilon"), x0 + delta, atol=1e-5, rtol=1e-4)
    before = guide_loss(ug._guide, ctx.decode(x0)).item()
    after = guide_loss(ug._guide, ctx.decode(x0 + delta)).item()
    assert after < before


def test_guided_sampling_lowers_the_palette_loss_on_the_same_seeds(bundle, target):
    req = GenerationRequest(prompt=PROMPT, steps=6, cfg=3.0, seed=0, n=2)
    plain = sample(bundle, req, progress=False)
    guided = sample(bundle, req, [_palette(target, s0=30.0)], progress=False)
    metric = PaletteGuide(target)
    assert _loss(metric, guided.images).mean() < _loss(metric, plain.images).mean() - 1.0


# ---------------------------------------------------------------------------------------------- recurrence
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_recurrence_k1_is_plain_sampling_exactly(bundle, target, scheduler):
    req = GenerationRequest(prompt=PROMPT, steps=3, cfg=3.0, seed=1, n=2, scheduler=scheduler)
    plain = sample(bundle, req, progress=False)
    k1 = sample(bundle, req, [_palette(target, s0=0.0, k=1)], progress=False)
    assert torch.equal(plain.latents, k1.latents)
    k3 = sample(bundle, req, [_palette(target, s0=0.0, k=3)], progress=False)
    again = sample(bundle, req, [_palette(target, s0=0.0, k=3)], progress=False)
    assert torch.equal(k3.latents, again.latents) and not torch.allclose(k3.latents, plain.latents)


def test_recurrence_renoises_with_the_papers_formula(bundle, target):
    """k = 2 with DDIM equals a hand-written loop: step, re-noise, step.

    Re-noising: z_t = sqrt(a_t / a_prev) z_prev + sqrt(1 - a_t / a_prev) noise.
    """
    req = GenerationRequest(prompt=PROMPT, steps=3, cfg=3.0, seed=2, n=1)
    ours = sample(bundle, req, [_palette(target, s0=0.0, k=2)], progress=False).latents
    ctx = Context.create(bundle, req, [])
    sched, branches = ctx.scheduler, guidance_branches(bundle, req)
    gens = [torch.Generator().manual_seed(2)]
    z = randn_tensor((1, 4, 8, 8), generator=gens)
    acp = sched.alphas_cumprod
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            a = acp[int(t)]
            a_prev = acp[int(sched.timesteps[i + 1])] if i + 1 < len(sched.timesteps) else sched.final_alpha_cumprod
            for r in range(2):
                out = bundle.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([b.context for b in branches]))
                u, c = out.sample.chunk(2)
                prev = sched.step(u + 3.0 * (c - u), t, z).prev_sample
                z = (a / a_prev).sqrt() * prev + (1 - a / a_prev).sqrt() * randn_tensor(z.shape, generator=gens) \
                    if r == 0 else prev
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- guides
def test_shipped_guides_rank_the_right_images(bundle):
    r = bundle.resolution
    red, blue = np.zeros((1, r, r, 3), np.uint8) + 200, np.zeros((1, r, r, 3), np.uint8) + 200
    red[0, : r // 2, : r // 2] = (220, 30, 30)
    blue[0, : r // 2, : r // 2] = (30, 90, 230)
    mask = np.zeros((r, r), np.uint8)
    mask[: r // 2, : r // 2] = 255
    region = RegionGuide(mask=mask, color="red")
    assert _loss(region, red)[0] < 1.0 < 50.0 < _loss(region, blue)[0]  # Lab deltaE units
    inside = BoxGuide(boxes=[[0.0, 0.0, 0.5, 0.5]], phrases=["a red square"])
    outside = BoxGuide(boxes=[[0.5, 0.5, 1.0, 1.0]], phrases=["a red square"])
    assert _loss(inside, red)[0] < 1.0 < 50.0 < _loss(outside, red)[0]
    palette = PaletteGuide(red[0])
    assert _loss(palette, red)[0] < 0.01 < 10 < _loss(palette, blue)[0]
    hist = PaletteGuide(red[0], mode="histogram")
    assert _loss(hist, red)[0] < 1e-4 < _loss(hist, blue)[0]


@pytest.mark.parametrize("kind", ["box", "region"])
def test_placement_guides_draw_their_colour_into_a_blank_region(kind):
    """Descending the guide on a plain grey image turns its region red and leaves the rest grey: the energy has
    a gradient on background pixels (a softmax over colour classes has ~none there, so it could not do this)."""
    from mmsynth.sample.guides import colour_distances, colour_index

    mask = np.zeros((32, 32), np.uint8)
    mask[4:16, 4:16] = 255
    guide = (BoxGuide(boxes=[[4 / 32, 4 / 32, 0.5, 0.5]], phrases=["a red circle"]) if kind == "box"
             else RegionGuide(mask=mask, color="red"))
    x = torch.full((1, 3, 32, 32), 0.6).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        guide_loss(guide, x).backward()
        opt.step()
    d = colour_distances(x.detach().clamp(-1, 1))[0, colour_index("red", "test")]
    inside, outside = d[4:16, 4:16], torch.ones(32, 32, dtype=torch.bool)
    outside[2:18, 2:18] = False
    assert (inside < 25).float().mean() >= 0.4  # at least ~fill of the region took the colour
    assert (d[outside] < 25).float().mean() < 0.02  # and nothing outside did


def test_guides_have_finite_gradients_on_saturated_pixels(bundle, target):
    x = torch.tensor([-1.0, 1.0]).repeat_interleave(3 * 16 * 16 // 2).reshape(1, 3, 16, 16).requires_grad_(True)
    mask = np.ones((16, 16), np.uint8)
    for g in (PaletteGuide(target), PaletteGuide(target, mode="histogram"), RegionGuide(mask=mask, color="blue"),
              BoxGuide(boxes=[[0.2, 0.2, 0.6, 0.6]], phrases=["a green star"])):
        (grad,) = torch.autograd.grad(guide_loss(g, x * 0.999), x)
        assert torch.isfinite(grad).all()


def test_clip_guide_image_text_and_image_image(bundle, target):
    for params in ({"text": "a red circle"}, {"image": target}):
        g = build_guide("clip", params, bundle)
        x = torch.zeros(2, 3, bundle.resolution, bundle.resolution, requires_grad=True)
        loss = g(x)
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert grad.abs().sum() > 0  # the gradient reaches the pixels through CLIP's vision tower


OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def test_the_clip_guide_normalises_pixels_as_the_clips_image_processor_says(bundle, tmp_path):
    import json

    from mmsynth.models import Bundle

    zoo_guide = build_guide("clip", {"text": "a red circle"}, bundle)  # a CLIP mmsynth trains reads [-1, 1]
    assert zoo_guide.mean.flatten().tolist() == [0.5] * 3 and zoo_guide.std.flatten().tolist() == [0.5] * 3
    bundle.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "clip" / "preprocessor_config.json"
    data = json.loads(config.read_text())
    assert data["image_mean"] == [0.5] * 3  # the convention is written where every CLIP user reads it
    config.write_text(json.dumps({**data, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD}))
    openai_like = Bundle.from_pretrained(tmp_path / "m")
    guide = build_guide("clip", {"text": "a red circle"}, openai_like)
    torch.testing.assert_close(guide.mean.flatten(), torch.tensor(OPENAI_MEAN))
    torch.testing.assert_close(guide.std.flatten(), torch.tensor(OPENAI_STD))
    x = torch.zeros(1, 3, bundle.resolution, bundle.resolution)
    with torch.no_grad():
        assert not torch.allclose(guide(x), zoo_guide(x))  # the same CLIP scores the same image otherwise
    given = build_guide("clip", {"text": "a red circle", "mean": 0.5, "std": 0.5}, openai_like)
    assert given.mean.flatten().tolist() == [0.5]  # an explicit normalisation still wins


def test_user_module_guides_and_their_json(bundle, target):
    class Brightness(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(1, 2, 3))

    req = GenerationRequest(prompt=PROMPT, steps=2, seed=0, n=2)
    out = sample(bundle, req, [UniversalGuidance(guide=Brightness(), s0=5.0)], progress=False)
    d = out.requests[0].controls[0]
    assert d["guide"] == "python:Brightness"
    with pytest.raises(InputError, match="cannot be rebuilt from JSON"):
        control_from_dict(d)


def test_guided_request_replays_exactly_from_json(bundle, target):
    mask = np.zeros((bundle.resolution,) * 2, np.uint8)
    mask[8:24, 8:24] = 255
    ug = UniversalGuidance(guide="region", params={"mask": mask, "color": "red"}, s0=5.0, k=2, m=1,
                           schedule=Schedule(start=0.0, end=0.75))
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=5, n=1)
    first = sample(bundle, req, [ug], progress=False)
    replay = GenerationRequest.from_json(first.requests[0].to_json())
    again = sample(bundle, replay, progress=False)
    assert torch.equal(first.latents, again.latents)


def test_guidance_composes_with_inpainting_and_img2img(bundle, target):
    r = bundle.resolution
    yy, xx = np.mgrid[0:r, 0:r]
    source = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)
    mask = np.zeros((r, r), np.uint8)
    mask[8:24, 8:24] = 255
    controls = [Img2Img(image=source, strength=0.9), BlendedInpaint(image=source, mask=mask),
                _palette(target, s0=10.0, k=2)]
    out = sample(bundle, GenerationRequest(prompt=PROMPT, steps=4, seed=0, n=2), controls, progress=False)
    for img in out.images:
        assert psnr(img, source, mask == 0) >= 35
        assert psnr(img, source, mask > 0) < 30  # the masked region was repainted


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,message", [
    ({"s0": -1.0}, "s0"), ({"k": 0}, "k \\(self-recurrence"), ({"k": 1.5}, "k \\(self-recurrence"),
    ({"m": -1}, "m \\(backward"), ({"lr": 0.0}, "lr"), ({"guide": "sharpness"}, "valid: box, clip, palette, region"),
    ({"guide": None}, "needs a guide"), ({"params": [1]}, "params"),
])
def test_bad_options_raise_input_error(kw, message):
    with pytest.raises(InputError, match=message):
        UniversalGuidance(**{"guide": "palette", "params": {}, **kw})


def test_bad_guides_raise_input_error(bundle, target):
    assert guide_names() == ["box", "clip", "palette", "region"]
    with pytest.raises(InputError, match="scalar or one loss per image"):
        sample(bundle, GenerationRequest(prompt=PROMPT, steps=1, n=2),
               [UniversalGuidance(guide=lambda x: x.mean(dim=1))], progress=False)
    with pytest.raises(InputError, match="tensor loss"):
        guide_loss(lambda x: 1.0, torch.zeros(1, 3, 4, 4))
    no_clip = tiny_bundle(seed=0)
    no_clip.clip = None
    with pytest.raises(InputError, match="no CLIP"):
        build_guide("clip", {"text": "a red circle"}, no_clip)
    with pytest.raises(InputError, match="bad parameters"):
        build_guide("palette", {"colour": "red"}, bundle)
    with pytest.raises(InputError, match="unknown colour"):
        RegionGuide(mask=np.ones((4, 4)), color="mauve")
    with pytest.raises(InputError, match="one box"):
        BoxGuide(boxes=[[0, 0, 1, 1]], phrases=[])
    with pytest.raises(InputError, match="x0 < x1"):
        BoxGuide(boxes=[[0.5, 0, 0.2, 1]], phrases=["a red circle"])
    with pytest.raises(InputError, match="fill"):
        BoxGuide(boxes=[[0, 0, 1, 1]], phrases=["a red circle"], fill=0)
    with pytest.raises(InputError, match="cells"):
        RegionGuide(mask=np.ones((4, 4)), color="red", cells=-1)


def test_the_loops_differentiable_prediction_gives_the_recomputed_gradient(bundle, target):
    class Recomputing(UniversalGuidance):  # the loop predicts without gradients; `after` runs the UNet again
        def wants_gradient(self, ctx, step):
            return False

    req = GenerationRequest(prompt=PROMPT, steps=4, cfg=3.0, seed=2, n=2)
    shared = sample(bundle, req, [_palette(target, s0=30.0, k=2)], progress=False)
    again = sample(bundle, req, [Recomputing(guide="palette", params={"target": target}, s0=30.0, k=2)],
                   progress=False)  # fmt: skip
    assert torch.allclose(shared.latents, again.latents, atol=1e-5)


def test_cli_help_lists_the_shipped_guides_without_importing_torch():
    import subprocess
    import sys

    from mmsynth.cli.guidance_options import GUIDE_NAMES
    from mmsynth.sample.guides import guide_names

    assert tuple(guide_names()) == GUIDE_NAMES
    code = ("import sys\nfrom mmsynth.cli.main import main\ntry:\n    main(['generate', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "palette" in out.stdout
