"""DDIM inversion through the one loop, reconstruction, prompt-swap editing, blended inpainting and their CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.evaluate.fidelity import psnr
from mmsynth.sample import (
    BlendedInpaint,
    GenerationRequest,
    InitialLatents,
    UniversalGuidance,
    edit_request,
    invert,
    load_latents,
    reconstruct,
    sample,
    save_latents,
)
from mmsynth.sample.attention import attention_modules
from mmsynth.sample.inversion import InvertedLatents
from mmsynth.sample.sampler import Context, encode_text, to_uint8

SOURCE, EDITED = "a red circle", "a blue circle"


@pytest.fixture(scope="module")
def image(gradient_image):
    return gradient_image


# ---------------------------------------------------------------------------------------------- inversion
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_inversion_matches_the_ddim_inverse_scheduler_loop(bundle, image, cfg, gradient_latents):
    steps = 8
    ours = invert(bundle, image, SOURCE, steps=steps, cfg=cfg).latents
    inverse = DDIMInverseScheduler.from_config(bundle.scheduler.config)
    inverse.set_timesteps(steps)
    cond, uncond = encode_text(bundle, [SOURCE]), encode_text(bundle, [""])
    z = gradient_latents
    with torch.no_grad():
        for t in inverse.timesteps:
            if cfg == 1.0:
                eps = bundle.unet(z, t, encoder_hidden_states=cond).sample
            else:
                out = bundle.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                u, c = out.chunk(2)
                eps = u + cfg * (c - u)
            z = inverse.step(eps, t, z).prev_sample
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, gradient_latents)  # it went somewhere


def test_partial_inversion_stops_where_img2img_of_that_strength_starts(bundle, image, gradient_latents):
    steps, strength = 8, 0.5
    full_path, z = [], gradient_latents
    inverse = DDIMInverseScheduler.from_config(bundle.scheduler.config)
    inverse.set_timesteps(steps)
    cond = encode_text(bundle, [SOURCE])
    with torch.no_grad():
        for t in inverse.timesteps:
            z = inverse.step(bundle.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
            full_path.append(z)
    partial = invert(bundle, image, SOURCE, steps=steps, strength=strength)
    torch.testing.assert_close(partial.latents, full_path[3], atol=1e-5, rtol=1e-4)  # int(8 * 0.5) inverse steps
    # the edit samples only the remaining steps, from the level the inversion reached: at cfg 1 with the source
    # prompt it is the forward DDIM loop over timesteps[4:] from that latent
    calls = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1])))
    try:
        edit = sample(bundle, edit_request(image, SOURCE, SOURCE, steps=steps, cfg=1.0, strength=strength,
                                           negative_prompt_inversion=False), progress=False)
    finally:
        handle.remove()
    assert calls[:4] == [int(t) for t in inverse.timesteps[:4]]  # the inversion ...
    assert len(calls) == 8 and calls[4] == int(inverse.timesteps[3])  # ... then 4 steps down from its last level
    reference = reconstruct(bundle, full_path[3], SOURCE, steps=steps, controls=[_start_at(steps - 4)]).latents
    torch.testing.assert_close(edit.latents, reference, atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="inversion strength must be a number in \\(0, 1\\]"):
        edit_request(image, SOURCE, EDITED, strength=1.5)
    with pytest.raises(InputError, match="runs no step"):
        invert(bundle, image, SOURCE, steps=4, strength=0.1)


def test_an_inverted_latents_control_inverts_again_when_its_strength_changes(bundle, image):
    request = GenerationRequest(prompt=EDITED, steps=6, cfg=1.0)
    reused = InvertedLatents(image=image, source_prompt=SOURCE)
    full = sample(bundle, request, [reused], progress=False, decode=False).latents
    reused.strength = 0.5  # the cached x_T of the full inversion must not be reused for another strength
    again = sample(bundle, request, [reused], progress=False, decode=False).latents
    fresh = sample(bundle, request, [InvertedLatents(image=image, source_prompt=SOURCE, strength=0.5)],
                   progress=False, decode=False).latents
    torch.testing.assert_close(again, fresh)
    assert not torch.allclose(again, full)


def _start_at(skip):
    """A control that starts the loop `skip` steps late from the latents it is handed (the reference above)."""
    from mmsynth.sample.controls import Control

    class SkipFirst(Control):
        name = "skip-first"

        def start(self, ctx):
            ctx.timesteps = ctx.scheduler.timesteps[skip:]
            return False

    return SkipFirst()


def test_round_trip_converges_with_steps_and_reports_psnr(bundle, image, capsys, gradient_latents):
    x0 = gradient_latents
    with torch.no_grad():
        vae_only = to_uint8(Context.create(bundle, GenerationRequest(), []).decode(x0))[0]
    errors, psnrs = {}, {}
    for steps in (10, 40, 120):
        x_t = invert(bundle, image, SOURCE, steps=steps).latents
        rec = reconstruct(bundle, x_t, SOURCE, steps=steps)
        errors[steps] = ((rec.latents - x0).norm() / x0.norm()).item()
        psnrs[steps] = psnr(rec.images[0], vae_only)
    with capsys.disabled():
        print("\n[tiny random model] round trip vs the VAE's own reconstruction: "
              + ", ".join(f"{s} steps {psnrs[s]:.1f} dB (latent rel. err {errors[s]:.2f})" for s in errors))
    # a random UNet's eps changes fast with t, so DDIM's one-step approximation needs many steps; it must converge
    assert errors[120] < 0.7 * errors[40] < 0.9 * errors[10]
    assert psnrs[120] > psnrs[10]


def test_negative_prompt_inversion_makes_cfg_exact(bundle, image):
    x_t = invert(bundle, image, SOURCE, steps=6).latents
    plain = reconstruct(bundle, x_t, SOURCE, steps=6, cfg=1.0)
    npi = reconstruct(bundle, x_t, SOURCE, steps=6, cfg=4.0, negative_prompt_inversion=True)
    null = reconstruct(bundle, x_t, SOURCE, steps=6, cfg=4.0)
    torch.testing.assert_close(npi.latents, plain.latents, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(null.latents, plain.latents, atol=1e-3)


def test_x_t_file_round_trip_and_inversion_replays_from_its_request(bundle, image, tmp_path):
    inv = invert(bundle, image, SOURCE, steps=4)
    save_latents(inv.latents, tmp_path / "x.safetensors", inv.request)
    x, meta = load_latents(tmp_path / "x.safetensors")
    assert torch.equal(x, inv.latents) and meta["format"] == "mmsynth.latents/1"
    replay = sample(bundle, GenerationRequest.from_dict(meta["request"]), progress=False, decode=False)
    assert torch.equal(replay.latents, inv.latents)
    from_file = sample(bundle, GenerationRequest(prompt=SOURCE, steps=4, cfg=1.0),
                       [InitialLatents(latents=str(tmp_path / "x.safetensors"))], progress=False)
    assert torch.equal(from_file.latents, reconstruct(bundle, x, SOURCE, steps=4).latents)


def test_a_batch_of_images_inverts_each_as_alone_and_each_replays(bundle, image):
    other = np.ascontiguousarray(image[::-1])
    batch = invert(bundle, [image, other], [SOURCE, EDITED], steps=4)
    for i, (img, prompt) in enumerate([(image, SOURCE), (other, EDITED)]):
        alone = invert(bundle, img, prompt, steps=4).latents[0]
        torch.testing.assert_close(batch.latents[i], alone, rtol=1e-4, atol=1e-4)
        replay = sample(bundle, GenerationRequest.from_dict(batch.requests[i].to_dict()), progress=False, decode=False)
        torch.testing.assert_close(replay.latents[0], alone, rtol=1e-4, atol=1e-4)  # its own image and prompt
    assert not torch.allclose(batch.latents[0], batch.latents[1])
    both = reconstruct(bundle, batch.latents, [SOURCE, EDITED], steps=4)
    torch.testing.assert_close(both.latents[1], reconstruct(bundle, batch.latents[1:], EDITED, steps=4).latents[0],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="needs a list of 2 prompts"):
        invert(bundle, [image, other], SOURCE, steps=4)
    with pytest.raises(InputError, match="2 images for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2, cfg=1.0, n=3),
               [_inversion([image, other])], progress=False, decode=False)


def test_inversion_refuses_what_cannot_run_backwards(bundle, image):
    with pytest.raises(InputError, match="use scheduler 'ddim'"):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2, cfg=1.0, scheduler="unipc"),
               [_inversion(image)], progress=False, decode=False)
    with pytest.raises(InputError, match="self-recurrence"):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2, cfg=1.0),
               [_inversion(image), UniversalGuidance(guide="palette", params={"target": image}, k=2)],
               progress=False, decode=False)
    with pytest.raises(InputError, match="1 or 1\\) x 4 x 8 x 8"):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2), [InitialLatents(latents=np.zeros((1, 4, 4, 4)))],
               progress=False)


def _inversion(image):
    from mmsynth.sample import DDIMInversion

    return DDIMInversion(image=image)


# ---------------------------------------------------------------------------------------------- editing
def test_prompt_swap_edit_is_a_replayable_request(bundle, image):
    req = edit_request(image, SOURCE, EDITED, steps=6, cfg=3.0)
    first = sample(bundle, req, progress=False)
    again = sample(bundle, GenerationRequest.from_json(first.requests[0].to_json()), progress=False)
    assert torch.equal(first.latents, again.latents)
    x_t = invert(bundle, image, SOURCE, steps=6).latents
    source = reconstruct(bundle, x_t, SOURCE, steps=6, cfg=3.0, negative_prompt_inversion=True)
    assert not torch.allclose(first.latents, source.latents, atol=1e-3)  # the prompt changed the result


def test_a_batch_of_edits_gives_each_edit_as_alone_and_each_replays(bundle, image):
    other = np.ascontiguousarray(image[::-1])
    sources, prompts = [SOURCE, "a green square"], [EDITED, "a red square"]
    batch_request = edit_request([image, other], sources, prompts, steps=3, seed=4, keep_attention=0.5)
    assert batch_request.negative_prompt == sources  # negative-prompt inversion, one per image
    batch = sample(bundle, batch_request, progress=False)
    for i, img in enumerate([image, other]):
        alone = sample(bundle, edit_request(img, sources[i], prompts[i], steps=3, seed=4 + i, keep_attention=0.5),
                       progress=False)  # fmt: skip
        assert np.abs(alone.images[0].astype(int) - batch.images[i].astype(int)).max() <= 2
        replay = sample(bundle, GenerationRequest.from_dict(batch.requests[i].to_dict()), progress=False)
        assert np.abs(replay.images[0].astype(int) - batch.images[i].astype(int)).max() <= 2
    with pytest.raises(InputError, match="lists of equally many"):
        edit_request([image, other], SOURCE, prompts)
    with pytest.raises(InputError, match="negative_prompt is a list of 2 prompts but n is 3"):
        GenerationRequest(prompt="x", negative_prompt=["a", "b"], n=3).validate()


@pytest.mark.parametrize("option", ["keep_attention", "cross_attention"])
def test_replaying_source_attention_changes_the_edit_and_leaves_the_unet_as_it_was(bundle, image, option):
    """keep_attention: attn1 queries/keys (forward hooks); cross_attention: attn2 maps (prompt-to-prompt)."""

    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    plain = sample(bundle, edit_request(image, SOURCE, EDITED, steps=4, cfg=3.0), progress=False)
    kept = sample(bundle, edit_request(image, SOURCE, EDITED, steps=4, cfg=3.0, **{option: 1.0}), progress=False)
    assert not torch.allclose(plain.latents, kept.latents, atol=1e-4)
    # with the source prompt on both sides, replaying its own attention changes nothing (for attn2 this also
    # shows diffusers' classic processor computing what the default SDPA one does)
    same = sample(bundle, edit_request(image, SOURCE, SOURCE, steps=4, cfg=3.0, **{option: 1.0}), progress=False)
    base = sample(bundle, edit_request(image, SOURCE, SOURCE, steps=4, cfg=3.0), progress=False)
    torch.testing.assert_close(same.latents, base.latents, atol=1e-5, rtol=1e-4)
    for m in attention_modules(bundle.unet).values():  # hooks removed, processors restored afterwards
        assert not m.to_q._forward_hooks and not m.to_k._forward_hooks
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before
    assert not any("get_attention_scores" in m.__dict__ for m in attention_modules(bundle.unet, "attn2").values())
    replay = sample(bundle, GenerationRequest.from_json(kept.requests[0].to_json()), progress=False)
    assert torch.equal(replay.latents, kept.latents)


def test_prompt_to_prompt_needs_prompts_of_equally_many_tokens(bundle, image):
    before = {k: type(v) for k, v in bundle.unet.attn_processors.items()}
    with pytest.raises(InputError, match="swaps words one for one"):
        sample(bundle, edit_request(image, SOURCE, "a big blue circle", steps=2, cross_attention=0.5), progress=False)
    assert {k: type(v) for k, v in bundle.unet.attn_processors.items()} == before


# ---------------------------------------------------------------------------------------------- inpainting
def test_inpainting_keeps_the_outside_and_repaints_the_inside(bundle, image):
    r = bundle.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[8:24, 10:22] = 255
    out = sample(bundle, GenerationRequest(prompt=SOURCE, steps=4, seed=0, n=2),
                 [BlendedInpaint(image=image, mask=mask)], progress=False)
    for img in out.images:
        assert psnr(img, image, mask == 0) >= 35
        assert psnr(img, image, mask > 0) < 25


def test_a_batch_inpaints_each_source_under_its_own_mask_and_each_replays(bundle, image):
    other = np.ascontiguousarray(image[::-1])
    r = image.shape[0]
    m1, m2 = np.zeros((r, r), np.uint8), np.zeros((r, r), np.uint8)
    m1[: r // 2], m2[:, r // 2:] = 255, 255
    request = GenerationRequest(prompt=[SOURCE, EDITED], n=2, steps=3, seed=5)
    batch = sample(bundle, request, [BlendedInpaint(image=[image, other], mask=[m1, m2])], progress=False)
    for i, (src, m) in enumerate([(image, m1), (other, m2)]):
        assert np.array_equal(batch.images[i][m == 0], src[m == 0])  # each keeps its own outside exactly
        replay = sample(bundle, GenerationRequest.from_dict(batch.requests[i].to_dict()), progress=False)
        assert np.abs(replay.images[0].astype(int) - batch.images[i].astype(int)).max() <= 2
    with pytest.raises(InputError, match="lists of equally many"):
        BlendedInpaint(image=[image, other], mask=m1)
    with pytest.raises(InputError, match="2 images for a batch of 3"):
        sample(bundle, GenerationRequest(prompt=SOURCE, n=3, steps=2), [BlendedInpaint(image=[image, other],
               mask=[m1, m2])], progress=False)  # fmt: skip


def test_inpainting_blends_the_known_latents_at_every_step(bundle, image, gradient_latents):
    r = bundle.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[:, : r // 2] = 255
    out = sample(bundle, GenerationRequest(prompt=SOURCE, steps=3, seed=0),
                 [BlendedInpaint(image=image, mask=mask, feather=0)], progress=False)
    x0 = gradient_latents
    torch.testing.assert_close(out.latents[..., r // 8:], x0[..., r // 8:])  # known half of the latent: the source


def test_resampled_inpainting_repeats_the_early_steps_and_still_keeps_the_outside(bundle, image, gradient_latents):
    r = bundle.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[:, : r // 2] = 255
    request = GenerationRequest(prompt=SOURCE, steps=4, seed=0)
    calls = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1])))
    try:
        out = sample(bundle, request, [BlendedInpaint(image=image, mask=mask, feather=0, resample=3,
                                                      resample_until=0.5)], progress=False)  # fmt: skip
    finally:
        handle.remove()
    t = [int(x) for x in _timesteps(bundle, 4)]
    assert calls == [t[0]] * 3 + [t[1]] * 3 + [t[2], t[3]]  # 3 passes over the first half of the steps
    torch.testing.assert_close(out.latents[..., r // 8:], gradient_latents[..., r // 8:])  # known half: the source
    assert np.array_equal(out.images[0][mask == 0], image[mask == 0])
    plain = sample(bundle, request, [BlendedInpaint(image=image, mask=mask, feather=0)], progress=False)
    assert not np.array_equal(plain.images[0], out.images[0])  # the repeats changed the repainted half
    one = sample(bundle, request, [BlendedInpaint(image=image, mask=mask, feather=0, resample=1)], progress=False)
    assert torch.equal(one.latents, plain.latents)
    replay = sample(bundle, GenerationRequest.from_dict(out.requests[0].to_dict()), progress=False)
    assert torch.equal(replay.latents, out.latents)
    for bad, message in (({"resample": 0}, "resample \\(passes per step"), ({"resample_until": 2}, "resample_until")):
        with pytest.raises(InputError, match=message):
            BlendedInpaint(image=image, mask=mask, **bad)
    with pytest.raises(InputError, match="self-recurrence"):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=2, cfg=1.0),
               [_inversion(image), BlendedInpaint(image=image, mask=mask, resample=2)], progress=False, decode=False)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_resampling_by_jumps_redoes_each_stretch_and_rewinds_the_scheduler(bundle, image, scheduler, gradient_latents):
    r = bundle.resolution
    mask = np.zeros((r, r), np.uint8)
    mask[:, : r // 2] = 255
    request = GenerationRequest(prompt=SOURCE, steps=6, seed=0, scheduler=scheduler)
    calls = []
    handle = bundle.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1])))
    try:
        out = sample(bundle, request, [BlendedInpaint(image=image, mask=mask, feather=0, resample=3, jump_length=2,
                                                      resample_until=0.5)], progress=False)  # fmt: skip
    finally:
        handle.remove()
    t = [int(x) for x in _timesteps(bundle, 6, scheduler)]
    # stretches [0, 1] and [2, 3] start in the first half: each runs 3 times; [4, 5] once
    assert calls == t[0:2] * 3 + t[2:4] * 3 + t[4:6]
    torch.testing.assert_close(out.latents[..., r // 8:], gradient_latents[..., r // 8:])  # known half: the source
    replay = sample(bundle, GenerationRequest.from_dict(out.requests[0].to_dict()), progress=False)
    assert torch.equal(replay.latents, out.latents)
    plain = sample(bundle, request, [BlendedInpaint(image=image, mask=mask, feather=0)], progress=False)
    assert not torch.allclose(plain.latents, out.latents)
    with pytest.raises(InputError, match="jump_length"):
        BlendedInpaint(image=image, mask=mask, jump_length=0)


def _timesteps(bundle, steps, scheduler="ddim"):
    from mmsynth.sample.schedulers import make_scheduler

    s = make_scheduler(scheduler, bundle.scheduler)
    s.set_timesteps(steps)
    return s.timesteps


@pytest.mark.parametrize("mask,message", [
    (np.full((32, 32), 128, np.uint8), "binary"),
    (np.zeros((16, 16), np.uint8) + np.eye(16, dtype=np.uint8) * 255, "same size"),
    (np.zeros((32, 32), np.uint8), "all black"),
])
def test_bad_masks_raise_input_error(bundle, image, mask, message):
    with pytest.raises(InputError, match=message):
        sample(bundle, GenerationRequest(prompt=SOURCE, steps=1), [BlendedInpaint(image=image, mask=mask)],
               progress=False)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def _cli(argv):
    from mmsynth.cli.main import main

    return main(argv)


def test_cli_invert_reconstruct_and_edit(model_dir, image, tmp_path, capsys):
    Image.fromarray(image).save(tmp_path / "in.png")
    x_t = tmp_path / "x_T.safetensors"
    assert _cli(["invert", str(tmp_path / "in.png"), "--prompt", SOURCE, "--out", str(x_t), "--steps", "5",
                 "--model", str(model_dir), "--reconstruct", str(tmp_path / "rec.png"), "--quiet"]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert _cli(["generate", "--latents", str(x_t), "--prompt", SOURCE, "--cfg", "1", "--steps", "5", "-n", "1",
                 "--model", str(model_dir), "--out", str(tmp_path / "gen"), "--quiet"]) == 0
    rec = np.asarray(Image.open(tmp_path / "rec.png"))
    assert np.array_equal(rec, np.asarray(Image.open(tmp_path / "gen" / "images" / "0000.png")))
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[4:20, 4:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert _cli(["edit", str(tmp_path / "in.png"), "--source-prompt", SOURCE, "--prompt", EDITED, "--steps", "4",
                 "--mask", str(tmp_path / "mask.png"), "--keep-attention", "0.5", "--strength", "0.5", "--resample",
                 "2", "--model", str(model_dir),
                 "--out", str(tmp_path / "edit"), "--quiet"]) == 0
    edited = np.asarray(Image.open(tmp_path / "edit" / "images" / "0000.png"))
    assert psnr(edited, image, mask == 0) >= 35
    names = [c["name"] for c in json.loads((tmp_path / "edit" / "request.json").read_text())["controls"]]
    assert names == ["inverted-latents", "source-attention", "inpaint"]
    controls = json.loads((tmp_path / "edit" / "request.json").read_text())["controls"]
    assert controls[0]["strength"] == 0.5 and controls[2]["resample"] == 2
    assert _cli(["generate", "--replay", str(tmp_path / "edit" / "requests" / "0000.json"), "--model", str(model_dir),
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert np.array_equal(edited, np.asarray(Image.open(tmp_path / "again" / "images" / "0000.png")))


def test_cli_guided_generation_replays(model_dir, image, tmp_path):
    Image.fromarray(image).save(tmp_path / "target.png")
    argv = ["generate", "--prompt", SOURCE, "--steps", "3", "-n", "1", "--guide", "palette", "--guide-target",
            str(tmp_path / "target.png"), "--s0", "5", "--k", "2", "--m", "1", "--model", str(model_dir), "--quiet"]
    assert _cli([*argv, "--out", str(tmp_path / "a")]) == 0
    assert _cli(["generate", "--replay", str(tmp_path / "a" / "request.json"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "images" / "0000.png")) for d in "ab")
    assert np.array_equal(a, b)


def _error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (stderr may also carry transformers' weight-loading progress bar)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("mmsynth")]


def _bad_latents(path):
    save_latents(torch.zeros(1, 4, 4, 4), path, GenerationRequest())
    return path


@pytest.mark.parametrize("extra,message", [
    (["--latents", "BAD"], "this model and size need"),
    (["--latents", "missing.safetensors"], "does not exist"),
    (["--guide", "sharpness"], "valid: box, clip, palette, region"),
    (["--guide", "palette", "--guide-target", "IMG", "--s0", "-1"], "s0"),
    (["--guide", "palette", "--guide-target", "IMG", "--k", "0"], "--k: must be an integer >= 1"),
    (["--s0", "3"], "needs --guide"),
    (["--init-image", "IMG", "--mask", "SMALLMASK"], "same size"),
    (["--init-image", "IMG", "--mask", "GREYMASK"], "binary"),
    (["--mask", "GREYMASK"], "needs --init-image"),
    (["--resample", "3"], "--resample needs --mask"),
    (["--init-image", "IMG", "--mask", "MASK", "--resample", "0"], "--resample: must be an integer >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line_and_no_output(model_dir, image, tmp_path, capsys, extra, message):
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.full(image.shape[:2], 100, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.eye(image.shape[0], dtype=np.uint8) * 255).save(tmp_path / "mask.png")
    subst = {"BAD": str(_bad_latents(tmp_path / "bad.safetensors")), "IMG": str(tmp_path / "img.png"),
             "SMALLMASK": str(tmp_path / "small.png"), "GREYMASK": str(tmp_path / "grey.png"),
             "MASK": str(tmp_path / "mask.png")}
    extra = [subst.get(a, a) for a in extra]
    argv = ["generate", "--prompt", SOURCE, "--steps", "1", "--model", str(model_dir), "--out", str(tmp_path / "out"),
            "--quiet", *extra]
    assert _cli(argv) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_invert_bad_input(model_dir, image, tmp_path, capsys):
    Image.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "x.safetensors"
    for extra, message in ((["--out", str(tmp_path / "x.pt")], "must end with .safetensors"),
                           (["--out", str(out), "--steps", "0"], "steps"),
                           (["--out", str(out), "--reconstruct", str(tmp_path / "r.png"),
                             "--reconstruct-scheduler", "plms"], "valid")):
        assert _cli(["invert", str(tmp_path / "in.png"), "--prompt", SOURCE, "--model", str(model_dir), "--quiet",
                     *extra]) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0]
        assert not out.exists() and not (tmp_path / "r.png").exists()
