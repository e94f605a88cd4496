"""The one sampler: parity with diffusers' pipelines, per-image seeds, replay, the control interface, the CLI."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.sample import (
    Control,
    GenerationRequest,
    Img2Img,
    ModelInputs,
    Schedule,
    Step,
    control_from_dict,
    make_scheduler,
    sample,
    scheduler_names,
)

PROMPT = "two red circles left of a blue square"


@pytest.fixture(scope="module")
def init_image(gradient_image):
    return gradient_image


def _pipe(cls, bundle, scheduler_name, **extra):
    pipe = cls(vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
               scheduler=make_scheduler(scheduler_name, bundle.scheduler), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scheduler", scheduler_names())
def test_text_to_image_matches_diffusers(bundle, scheduler):
    req = GenerationRequest(prompt=PROMPT, negative_prompt="a green star", scheduler=scheduler, steps=4, cfg=4.0,
                            seed=3, n=2)
    ours = sample(bundle, req, progress=False)
    pipe = _pipe(StableDiffusionPipeline, bundle, scheduler)
    ref = pipe(PROMPT, negative_prompt="a green star", num_inference_steps=4, guidance_scale=4.0,
               num_images_per_prompt=2, generator=_gens(3, 2), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=1e-5, rtol=1e-4)
    assert ours.images.shape == (2, bundle.resolution, bundle.resolution, 3) and ours.images.dtype == np.uint8
    assert ours.images.std() > 1.0  # a real picture, not a constant


def test_pixels_match_diffusers_and_cfg_one_is_conditional_only(bundle):
    for cfg in (6.0, 1.0):
        req = GenerationRequest(prompt=PROMPT, steps=3, cfg=cfg, seed=5, n=1)
        ours = sample(bundle, req, progress=False).images
        ref = _pipe(StableDiffusionPipeline, bundle, "ddim")(
            PROMPT, num_inference_steps=3, guidance_scale=cfg, generator=_gens(5, 1), output_type="np").images
        assert np.abs(ours.astype(int) - _to_uint8(ref).astype(int)).max() <= 1


@pytest.mark.parametrize("scheduler,strength", [("ddim", 0.6), ("dpmpp-2m", 0.75), ("euler", 1.0)])
def test_img2img_matches_diffusers(bundle, init_image, scheduler, strength):
    req = GenerationRequest(prompt=PROMPT, scheduler=scheduler, steps=5, cfg=3.0, seed=1, n=2)
    ours = sample(bundle, req, [Img2Img(image=init_image, strength=strength)], progress=False)
    pipe = _pipe(StableDiffusionImg2ImgPipeline, bundle, scheduler)
    ref = pipe(PROMPT, image=Image.fromarray(init_image), strength=strength, num_inference_steps=5, guidance_scale=3.0,
               num_images_per_prompt=2, generator=_gens(1, 2), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=1e-5, rtol=1e-4)


def test_img2img_strength_keeps_the_image(bundle, init_image):
    """Lower strength ends closer to the init image's latents (the control really starts from it)."""
    x = torch.from_numpy(init_image / 127.5 - 1).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z0 = bundle.vae.encode(x).latent_dist.mean * bundle.vae.config.scaling_factor
    req = GenerationRequest(prompt=PROMPT, steps=10, cfg=1.0, seed=0)
    dist = [(sample(bundle, req, [Img2Img(image=init_image, strength=s)], progress=False).latents - z0).abs().mean()
            for s in (0.2, 1.0)]
    assert dist[0] < dist[1]


# ---------------------------------------------------------------------------------------------- seeds and replay
def test_batch_is_reproducible_image_by_image(bundle):
    batch = sample(bundle, GenerationRequest(prompt=PROMPT, steps=3, seed=10, n=2), progress=False)
    single = sample(bundle, batch.requests[1], progress=False)
    assert batch.requests[1].seed == 11 and batch.requests[1].n == 1
    torch.testing.assert_close(batch.latents[1:], single.latents, atol=1e-5, rtol=1e-4)
    assert np.abs(batch.images[1].astype(int) - single.images[0].astype(int)).max() <= 1
    assert not np.array_equal(batch.images[0], batch.images[1])


def test_request_json_round_trip_replays_exactly(bundle, init_image):
    req = GenerationRequest(prompt=PROMPT, negative_prompt="a star", scheduler="unipc", steps=3, cfg=2.5, seed=7,
                            n=2, controls=[Img2Img(image=init_image, strength=0.7).to_dict()])
    first = sample(bundle, req, progress=False)
    text = first.requests[0].to_json()
    json.loads(text)  # plain JSON, the init image embedded
    again = GenerationRequest.from_json(text)
    assert again == first.requests[0]
    assert np.array_equal(control_from_dict(again.controls[0]).image, init_image)
    batch_again = sample(bundle, GenerationRequest.from_json(req.to_json()), progress=False)
    assert np.array_equal(batch_again.images, first.images)
    assert torch.equal(batch_again.latents, first.latents)


def test_negative_prompt_and_empty_prompt(bundle):
    base = GenerationRequest(prompt=PROMPT, steps=3, cfg=5.0, seed=0)
    a = sample(bundle, base, progress=False).latents
    b = sample(bundle, replace(base, negative_prompt="a green star"), progress=False).latents
    c = sample(bundle, replace(base, prompt=""), progress=False)  # unconditional generation is allowed
    assert not torch.allclose(a, b) and not torch.allclose(a, c.latents)
    assert c.images.shape[0] == 1


def test_unknown_words_are_named(bundle, caplog):
    with caplog.at_level(logging.WARNING):
        sample(bundle, GenerationRequest(prompt="a red zebra circle", steps=1, seed=0), progress=False)
    assert "zebra" in caplog.text


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"cfg": -1.0}, "cfg"),
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"eta": 2.0}, "eta"),
        ({"scheduler": "heun"}, "ddim"),
        ({"controls": [{"name": "telepathy"}]}, "img2img"),
        ({"controls": [{"name": "img2img", "image": "x.png", "strength": 0.0}]}, "strength"),
        ({"controls": [{"name": "img2img", "image": "x.png", "strength": 1.5}]}, "strength"),
        ({"controls": [{"name": "img2img", "image": "x.png", "colour": 1}]}, "colour"),
        ({"controls": [{"name": "img2img", "image": "x.png", "schedule": {"start": 0.9, "end": 0.1}}]}, "start"),
        ({"height": 0}, "height"),
    ],
)
def test_bad_requests_raise_input_error_naming_the_field(change, field):
    d = {**GenerationRequest().to_dict(), **change}
    with pytest.raises(InputError, match=field):
        GenerationRequest.from_dict(d)


def test_bad_json_and_sizes(bundle):
    with pytest.raises(InputError, match="not valid JSON"):
        GenerationRequest.from_json("{nope")
    with pytest.raises(InputError, match="unknown field"):
        GenerationRequest.from_dict({"prompt": "x", "guidance": 3})
    with pytest.raises(InputError, match="not a multiple of the model's VAE factor 4; the nearest valid height is 32"):
        sample(bundle, GenerationRequest(steps=1, height=30), progress=False)
    with pytest.raises(InputError, match="strength"):  # 0.1 * 3 steps runs no step
        sample(bundle, GenerationRequest(steps=3), [Img2Img(image=np.zeros((8, 8, 3), np.uint8), strength=0.1)],
               progress=False)


# ---------------------------------------------------------------------------------------------- the control interface
@dataclass(kw_only=True)
class _TestControlNet(Control):
    """A ControlNet plugged in through `inputs` only: proves residuals, per-residual scales and branches."""

    name: ClassVar[str] = "test-controlnet"
    image: np.ndarray | None = None

    def inputs(self, ctx, step, branch, latents):
        cond = torch.from_numpy(self.image.astype(np.float32) / 255).permute(2, 0, 1)[None].repeat(len(latents), 1,
                                                                                                   1, 1)
        down, mid = self.model(latents, step.t, encoder_hidden_states=branch.context, controlnet_cond=cond,
                               return_dict=False)
        return ModelInputs(down_residuals=list(down), mid_residual=mid)


@pytest.fixture(scope="module")
def controlnet(bundle):
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(bundle.unet, conditioning_embedding_out_channels=(8, 16, 32))
    with torch.no_grad():  # the zero convs would make the test vacuous
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    return cn.eval()


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_through_inputs_matches_diffusers(bundle, controlnet, init_image, guess_mode):
    n_res = len(controlnet.controlnet_down_blocks) + 1
    scales = torch.logspace(-1, 0, n_res).tolist()
    schedule = Schedule(scale=scales, branch="cond") if guess_mode else Schedule(scale=0.7)
    control = _TestControlNet(image=init_image, schedule=schedule)
    control.model = controlnet
    req = GenerationRequest(prompt=PROMPT, steps=3, cfg=4.0, seed=2, n=2)
    ours = sample(bundle, req, [control], progress=False)
    plain = sample(bundle, req, progress=False)
    pipe = _pipe(StableDiffusionControlNetPipeline, bundle, "ddim", controlnet=controlnet)
    ref = pipe(PROMPT, image=Image.fromarray(init_image), num_inference_steps=3, guidance_scale=4.0,
               num_images_per_prompt=2, generator=_gens(2, 2), output_type="latent", guess_mode=guess_mode,
               controlnet_conditioning_scale=1.0 if guess_mode else 0.7).images
    torch.testing.assert_close(ours.latents, ref, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)


@dataclass(kw_only=True)
class _Recurrent(Control):
    name: ClassVar[str] = "test-recurrent"
    k: int = 1

    def repeats(self, ctx, step):
        return self.k


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_self_recurrence_rewinds_the_scheduler(bundle, scheduler):
    req = GenerationRequest(prompt=PROMPT, scheduler=scheduler, steps=3, seed=4)
    plain = sample(bundle, req, progress=False)
    k1 = sample(bundle, req, [_Recurrent(k=1)], progress=False)
    k3 = sample(bundle, req, [_Recurrent(k=3)], progress=False)
    assert torch.equal(plain.latents, k1.latents)
    assert torch.isfinite(k3.latents).all() and not torch.allclose(plain.latents, k3.latents)


@dataclass(kw_only=True)
class _DecodedBrightness(Control):
    """Universal-guidance shaped: gradient of a loss on the DECODED x0_hat through the guided prediction."""

    name: ClassVar[str] = "test-guide"
    grads: list = None  # type: ignore[assignment]

    def before(self, ctx, step, latents, predict):
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            x0 = step.to_x0(z, predict(z), ctx.prediction_type)
            loss = ctx.decode(x0).mean()
            (grad,) = torch.autograd.grad(loss, z)
        self.grads.append(grad)
        return latents - 0.1 * grad


def test_before_hook_gets_gradients_through_unet_and_decoder(bundle):
    guide = _DecodedBrightness(grads=[], schedule=Schedule(end=0.5))
    req = GenerationRequest(prompt=PROMPT, steps=4, seed=0)
    out = sample(bundle, req, [guide], progress=False)
    assert len(guide.grads) == 2  # active for the first half of the steps only
    assert all(g.abs().sum() > 0 for g in guide.grads)
    assert not torch.allclose(out.latents, sample(bundle, req, progress=False).latents)


def test_schedule_activity_follows_diffusers_rule():
    sched = Schedule(start=0.25, end=0.75)
    steps = [Step(i, 8, torch.tensor(0), 0.5, 0.6) for i in range(8)]
    assert [sched.active(s) for s in steps] == [False, False, True, True, True, True, False, False]
    assert Schedule.from_dict(sched.to_dict()) == sched
    with pytest.raises(InputError, match="branch"):
        Schedule(branch="sideways")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


def _cli(argv):
    from mmsynth.cli.main import main

    return main(argv)


def test_cli_generate_writes_replayable_outputs(model_dir, tmp_path, init_image):
    out = tmp_path / "out"
    Image.fromarray(init_image).save(tmp_path / "init.png")
    rc = _cli(["generate", "--prompt", PROMPT, "-n", "2", "--seed", "0", "--steps", "2", "--cfg", "3", "--model",
               str(model_dir), "--out", str(out), "--init-image", str(tmp_path / "init.png"), "--strength", "0.9",
               "--quiet"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["images/0000.png", "images/0001.png"]
    assert rows[1]["prompt"] == PROMPT and rows[1]["request"]["seed"] == 1
    assert (out / "grid.png").exists() and (out / "requests" / "0001.json").exists()
    rc = _cli(["generate", "--replay", str(out / "requests" / "0001.json"), "--out", str(tmp_path / "again"),
               "--quiet"])
    assert rc == 0
    first = np.asarray(Image.open(out / "images" / "0001.png")).astype(int)
    again = np.asarray(Image.open(tmp_path / "again" / "images" / "0000.png")).astype(int)
    assert np.abs(first - again).max() <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "steps"),
        (["--cfg", "-2"], "cfg"),
        (["-n", "0"], "--n: must be an integer >= 1"),
        (["--scheduler", "plms"], "valid"),
        (["--strength", "0.5"], "--init-image"),
        (["--init-image", "missing.png"], "does not exist"),
        (["--model", "no/such/dir/here"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_2_without_output(model_dir, tmp_path, capsys, args, message):
    argv = ["generate", "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "out"), "--quiet"]
    if "--model" not in args:
        argv += ["--model", str(model_dir)]
    assert _cli(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_batch_of_prompts_gives_each_image_its_own_prompt_and_seed(bundle):
    from mmsynth.sample import GenerationRequest, sample

    prompts = ["a red circle", "two blue squares", ""]
    batch = sample(bundle, GenerationRequest(prompt=prompts, n=3, seed=7, steps=2), progress=False)
    assert [r.prompt for r in batch.requests] == prompts and [r.seed for r in batch.requests] == [7, 8, 9]
    for img, req in zip(batch.images, batch.requests):  # each replayable alone
        alone = sample(bundle, req, progress=False).images[0]
        assert np.abs(alone.astype(int) - img.astype(int)).max() <= 2
    with pytest.raises(InputError, match="list of 2 prompts but n is 3"):
        GenerationRequest(prompt=prompts[:2], n=3).validate()
    with pytest.raises(InputError, match="list of strings"):
        GenerationRequest(prompt=["a", 3], n=2).validate()
