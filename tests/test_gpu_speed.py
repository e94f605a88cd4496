"""benchmarks/gpu_speed.py at its tiny CPU size (its rows run, the JSON has its structure, the fast row's images are the
eager pipeline's), and mmsynth's fast path (`mmsynth.sample.fast_path`) against diffusers: its scheduler tables
against the schedulers' own `step`, and its images against StableDiffusion(ControlNet)Pipeline on a tiny random
model. The CUDA graph and compile paths need a GPU and are not run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from mmsynth.models.zoo import TINY, build_controlnet, random_bundle
from mmsynth.sample.fast_path import FastSampler, LinearSchedule, encode_prompt
from mmsynth.sample.schedulers import make_scheduler
from script_module import script_module

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
PIXEL_TOLERANCE = 0.01  # on the 0-255 scale: float32 rounding of the scheduler arithmetic (~1e-4 measured)
IMAGE_TOLERANCE = 1e-5  # on [0, 1]
ROW_KEYS = {"row", "batch", "seconds_per_image", "images_per_second", "warmup_seconds", "run_seconds",
            "peak_memory_gib", "flop_floor_fraction", "max_pixel_difference", "notes", "error"}  # fmt: skip
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.fixture(scope="module")
def bench():
    with script_module(BENCH) as module:
        yield module


# ---------------------------------------------------------------------------------------------- the benchmark
def test_the_tiny_cpu_run_has_its_structure_and_the_fast_row_matches_eager(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--device", "cpu", "--tiny", "--batches", "1", "--steps", "2", "--repeats", "1", "--warmup", "1",
            "--threads", "1", "--peak-tflops", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] and env["device"] and env["cuda"] is None
    assert result["settings"]["steps"] == 2 and result["settings"]["batches"] == [1]
    assert result["settings"]["rows"] == ["eager", "fast"] and result["settings"]["tiny"]
    assert result["peak_flops"] == 1e12
    flops = result["flops"]["1"]
    assert flops["step"] > 0 and flops["decode"] > 0
    assert flops["floor_seconds_per_image"] == pytest.approx((2 * flops["step"] + flops["decode"]) / 1e12)
    eager, fast = result["rows"]
    assert (eager["row"], fast["row"]) == ("eager", "fast")
    for row in (eager, fast):
        assert set(row) == ROW_KEYS and row["error"] is None and row["batch"] == 1
        assert len(row["run_seconds"]) == 1 and row["seconds_per_image"] == pytest.approx(row["run_seconds"][0])
        assert row["images_per_second"] == pytest.approx(1 / row["seconds_per_image"])
        assert row["warmup_seconds"] > 0 and row["peak_memory_gib"] is None  # (no GPU memory on a CPU)
        assert row["flop_floor_fraction"] == pytest.approx(flops["floor_seconds_per_image"] / row["seconds_per_image"])
    assert eager["max_pixel_difference"] == 0
    assert fast["max_pixel_difference"] <= PIXEL_TOLERANCE, fast
    assert fast["notes"] == "eager loop"  # no CUDA graph on a CPU
    assert [g["met"] for g in result["goals"]][1:] == [None, None]  # no compiled row, no batch 8
    printed = capsys.readouterr().out
    assert "goal  fast: batch 1 at most 0.2 s/image" in printed and "TFLOP per step" in printed


def test_the_full_size_models_have_sd15s_parameter_counts(bench):
    models = bench.build_models(tiny=False, device="meta", dtype=torch.float16)  # no memory, no compute
    millions = bench.parameter_millions(models)
    assert {k: millions[k] for k in bench.EXPECTED_MILLIONS} == {"unet": 859.5, "controlnet": 361.3, "vae": 83.7}
    bench.check_parameter_counts(millions)
    with pytest.raises(AssertionError, match=r"differ from SD 1\.5"):
        bench.check_parameter_counts({**millions, "unet": 860.0})


def test_an_unknown_row_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--rows", "eager,deepcache"])
    assert "unknown row" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the scheduler tables
@pytest.mark.parametrize("scheduler", [
    UniPCMultistepScheduler(**SD),  # bh2, order 2: the benchmark's
    UniPCMultistepScheduler(**SD, solver_order=3, timestep_spacing="leading"),
    UniPCMultistepScheduler(**SD, prediction_type="v_prediction", lower_order_final=False,
                            final_sigmas_type="sigma_min"),  # (a last order-2 step divides by 0 at sigma 0)
    DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False),
    DPMSolverMultistepScheduler(**SD),
], ids=["unipc", "unipc3-leading", "unipc-v", "ddim", "dpmpp2m"])  # fmt: skip
def test_the_tables_reproduce_the_schedulers_step_in_float32(scheduler):
    steps = 12
    table = LinearSchedule.from_scheduler(scheduler, steps)
    scheduler.set_timesteps(steps)
    assert torch.equal(table.timesteps, scheduler.timesteps)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    x, outputs = x0, []
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(scheduler.scale_model_input(x, t), x * table.input_scale[i])
        outputs.append(torch.randn(x0.shape, generator=gen))
        x = scheduler.step(outputs[-1], t, x, return_dict=False)[0]
        mine = table.start_coef[i] * x0 + torch.tensordot(table.output_coef[i, : i + 1], torch.stack(outputs), dims=1)
        torch.testing.assert_close(mine, x, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(table.output_coef.triu(1)) == 0  # a step reads no later output


@pytest.mark.parametrize(("scheduler", "why"), [
    (DDIMScheduler(**SD), "not a linear map"),  # clip_sample=True by default
    (UniPCMultistepScheduler(**SD, solver_type="bh1"), "non-finite"),  # diffusers' own last step divides 0 by 0
])  # fmt: skip
def test_a_scheduler_the_tables_cannot_reproduce_is_refused(scheduler, why):
    with pytest.raises(ValueError, match=why):
        LinearSchedule.from_scheduler(scheduler, 10)


# ---------------------------------------------------------------------------------------------- the sampler
@pytest.fixture(scope="module")
def tiny():
    """The zoo's tiny random bundle and a ControlNet for it whose zero convolutions are not zero."""
    b = random_bundle(TINY, seed=0)
    torch.manual_seed(1)
    cn = build_controlnet(b.unet, b.vae_scale_factor)
    with torch.no_grad():
        for p in [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    return b, cn.eval()


def _inputs(b, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    side = b.resolution // b.vae_scale_factor
    noise = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(batch))
    control = torch.rand(1, 3, b.resolution, b.resolution, generator=torch.Generator().manual_seed(7))
    return noise, control


@pytest.mark.parametrize(("scheduler", "cfg", "with_controlnet", "batch"), [
    ("unipc", 7.5, True, 2), ("ddim", 7.5, True, 1), ("unipc", 1.0, False, 2), ("dpmpp-2m", 5.0, False, 1),
])  # fmt: skip
def test_the_fast_path_makes_the_pipelines_images(tiny, scheduler, cfg, with_controlnet, batch):
    b, cn = tiny
    noise, control = _inputs(b, batch)
    prompt, steps = "two red circles left of a blue square", 4
    common = dict(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False,
                  scheduler=make_scheduler(scheduler, b.scheduler))  # fmt: skip
    call = dict(num_inference_steps=steps, guidance_scale=cfg, num_images_per_prompt=batch, latents=noise,
                height=b.resolution, width=b.resolution, output_type="pt")  # fmt: skip
    if with_controlnet:
        pipe = StableDiffusionControlNetPipeline(controlnet=cn, **common)
        call["image"] = control
    else:
        pipe = StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, **call).images

    sampler = FastSampler(b.unet, b.vae, make_scheduler(scheduler, b.scheduler), steps=steps, guidance_scale=cfg,
                          controlnet=cn if with_controlnet else None)  # fmt: skip
    assert not sampler.cuda_graph and not sampler.channels_last and sampler.cfg == (cfg > 1)
    embeds = encode_prompt(b.tokenizer, b.text_encoder, prompt, batch)
    images = sampler(*embeds, noise, control if with_controlnet else None)
    assert images.shape == expected.shape and images.dtype == torch.float32
    assert float((images - expected).abs().max()) <= IMAGE_TOLERANCE
    assert float(expected.std()) > 0.01  # (not a blank picture)
    assert torch.equal(sampler(*embeds, noise, control if with_controlnet else None), images)  # buffers reset


def test_the_fast_path_in_channels_last_and_at_two_batch_sizes(tiny):
    """channels_last (CUDA's default) changes nothing but rounding; each input shape gets its own buffers."""
    b, cn = tiny
    sampler = FastSampler(b.unet, b.vae, make_scheduler("unipc", b.scheduler), controlnet=cn, steps=3)
    channels_last = FastSampler(b.unet, b.vae, make_scheduler("unipc", b.scheduler), controlnet=cn, steps=3,
                                channels_last=True)  # fmt: skip
    try:
        for batch in (1, 3):
            noise, control = _inputs(b, batch)
            embeds = encode_prompt(b.tokenizer, b.text_encoder, "a red circle", batch)
            latents = sampler(*embeds, noise, control, decode=False)
            assert latents.shape == noise.shape
            torch.testing.assert_close(channels_last(*embeds, noise, control, decode=False), latents, rtol=1e-4,
                                       atol=1e-4)  # fmt: skip
        assert len(sampler._buffers) == 2
        sampler.release()
        assert not sampler._buffers
    finally:  # the module-scoped models go back to the default memory format
        for m in (b.unet, cn, b.vae):
            m.to(memory_format=torch.contiguous_format)


def test_the_fast_path_refuses_what_it_cannot_do(tiny):
    b, _ = tiny
    with pytest.raises(ValueError, match="CUDA"):
        FastSampler(b.unet, b.vae, make_scheduler("ddim", b.scheduler), cuda_graph=True)
    sampler = FastSampler(b.unet, b.vae, make_scheduler("ddim", b.scheduler), steps=2)
    noise, control = _inputs(b, 1)
    embeds = encode_prompt(b.tokenizer, b.text_encoder, "a red circle", 1)
    with pytest.raises(ValueError, match="control image"):
        sampler(*embeds, noise, control)
