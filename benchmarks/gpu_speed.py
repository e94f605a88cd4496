"""Text-to-image + ControlNet speed at Stable Diffusion 1.5 size: diffusers eager, diffusers compiled, mmsynth's fast
path (`mmsynth.sample.fast_path.FastSampler`), side by side in one run on the same weights, noise and condition.

Models: SD 1.5's UNet (859.5M parameters), a ControlNet made from it (`ControlNetModel.from_unet`, 361.3M; its zero
convolutions get small random weights so that the control changes the output), SD's VAE (83.7M) and a CLIP-L-sized
text encoder, from their published configurations (written out below) with random weights: speed does not depend
on the weights. The tokenizer is mmsynth's word-level Shapes tokenizer padded to 77 tokens (nothing is downloaded).
UniPC (`UniPCMultistepScheduler`, 20 steps), CFG 7.5, 512x512, fp16 on CUDA (float32 on a CPU), batches 1, 4, 8.
The parameter counts are printed and, at full size, asserted.

Rows (--rows), run one after another (every batch of a row, then the next row) in this order:

    eager           diffusers' StableDiffusionControlNetPipeline as it comes
    compiled        the same with torch.compile'd UNet and ControlNet (--compile-mode, dynamic=False: one compile per
                    batch size, counted in its warm-up); by default on CUDA only
    fast            FastSampler: fused CFG batch, channels_last, SDPA, the scheduler as device tables, and one whole
                    denoising step captured in a CUDA graph and replayed (on a CPU: the same loop, eagerly)
    fast-compiled   FastSampler with torch.compile'd networks and VAE decoder inside its graph (not by default)

Every row encodes the prompt, samples and decodes to images on the device (the pipelines with output_type="pt").
The fast rows convert the modules to channels_last in place, hence they run last.

Columns: seconds per image (median of --repeats timed runs after --warmup untimed ones, / batch); images/s; warm-up
seconds (the untimed runs: compilation, graph capture, cuDNN autotuning); peak GPU memory of the timed runs
(torch.cuda.max_memory_allocated, weights included; null on a CPU); fraction of the FLOP floor; the largest pixel
difference (0-255 scale, float) from the eager row's images at the same batch (fp16 rounding on a GPU; ~1e-3 on a
CPU in float32, where the fast path's float32 scheduler tables and diffusers' step round differently).

FLOP floor: `torch.utils.flop_counter.FlopCounterMode` counts one ControlNet + UNet call at the CFG batch (2B) and
one VAE decode at B; floor seconds per image = (steps * step + decode) / B / the GPU's dense fp16 peak (H100 SXM and
H200: 989.4e12/s, H100 PCIe 756.5e12, A100 312e12, by torch.cuda.get_device_name; --peak-tflops overrides; unknown
device: null); fraction = floor / measured seconds per image (1 = every FLOP at peak, unreachable).

Goals, printed beside the results and not asserted: batch 1 at most 0.2 s/image, and at least 4x faster than
diffusers compiled; batch 8 at 50% or more of the FLOP floor.

    python benchmarks/gpu_speed.py                          # CUDA if there is one; else --tiny on the CPU
    python benchmarks/gpu_speed.py --tiny --batches 1 --steps 2 --json out.json
    python benchmarks/gpu_speed.py --device cuda --batches 1,8 --rows eager,fast --json out.json

--tiny (the default on a CPU) scales everything down (UNet widths (32, 64), VAE (32, 64, 64), a 2-layer text encoder;
64x64 images, 16x16 latents, 2 steps, batches 1 and 2, float32) so that the whole run takes seconds: CI's smoke test,
and the check that the fast path makes the eager pipeline's images. On a 2-core CPU shared with a training job
(torch 2.13 CPU, diffusers 0.42.1, --threads 1, `--rows eager,compiled,fast,fast-compiled --batches 1 --repeats 1`):

    row            batch  s/image  images/s  warm-up s  max px diff  notes
    eager          1      0.1713   5.84      0.18       0.0000       diffusers
    compiled       1      0.1192   8.39      137.44     0.0013       diffusers, torch.compile mode=default
    fast           1      0.1650   6.06      0.17       0.0003       eager loop
    fast-compiled  1      0.1120   8.93      79.16      0.0012       eager loop, torch.compile mode=default

(tiny networks: timings say nothing about a GPU; the GPU rows are not measured yet.)

On the lent GPU (no diffusers there; see ../shared/gpu/README.md): here, once, `bash ../shared/gpu/wheels.sh` (it
downloads the wheels into .gpu-wheels/), then one device call with carry=[".gpu-wheels"] and the command

    python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl && export PYTHONPATH=$PWD/src:$PWD &&
    python3 benchmarks/gpu_speed.py --repeats 3 --json $OUT/gpu_speed.json

(a guess, unmeasured: 5-8 minutes on an H100, most of it the compiled row's three compilations; --rows eager,fast
skips them).
--compile-mode max-autotune-no-cudagraphs is the stronger compiled baseline but compiles for many minutes per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

ROWS = ("eager", "compiled", "fast", "fast-compiled")
PROMPT = "two red circles left of a blue square"
Run = Callable[[], torch.Tensor]

# ---------------------------------------------------------------------------------------------- configurations
# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ and scheduler/ config.json).
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    sample_size=512, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
SD15_TEXT: dict[str, Any] = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")  # fmt: skip
SD15_CONTROL_WIDTHS = (16, 32, 96, 256)  # the condition encoder: 3 stride-2 steps, the VAE's factor 8
# SD 1.5's scheduler config, as `UniPCMultistepScheduler.from_config(pipe.scheduler.config)` reads it
SD15_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", steps_offset=1,
                                      timestep_spacing="leading")  # fmt: skip
SD15_RESOLUTION = 512
EXPECTED_MILLIONS = {"unet": 859.5, "controlnet": 361.3, "vae": 83.7}

TINY_UNET: dict[str, Any] = dict(
    SD15_UNET, sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
TINY_VAE: dict[str, Any] = dict(SD15_VAE, block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=64,
                                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT: dict[str, Any] = dict(SD15_TEXT, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=None)  # vocab: the tokenizer's  # fmt: skip
TINY_CONTROL_WIDTHS = (16, 32, 64)  # two stride-2 steps: the tiny VAE's factor 4
TINY_RESOLUTION = 64

# dense fp16 tensor-core peaks (FLOP/s) by device name: (substrings that must all occur, peak); first match wins
PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.5e12), (("H100",), 989.4e12), (("H200",), 989.4e12), (("A100",), 312e12),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row shares."""

    tiny: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    steps: int = 2
    cfg: float = 7.5
    batches: tuple[int, ...] = (1, 2)
    rows: tuple[str, ...] = ("eager", "fast")
    repeats: int = 3
    warmup: int = 1
    compile_mode: str = "default"
    peak_tflops: float | None = None
    seed: int = 0


@dataclasses.dataclass
class Models:
    """The components every row shares, on the device in the benchmark's dtype."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    controlnet: Any
    vae: Any
    scheduler_config: dict[str, Any]
    resolution: int

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def scheduler(self) -> Any:
        """A fresh UniPC scheduler (each row gets its own: schedulers keep state)."""
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(**self.scheduler_config)


# ---------------------------------------------------------------------------------------------- models
def build_models(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> Models:
    """Random-weight SD 1.5 components (or their --tiny scale-down), built directly on the device."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmsynth.models.tokenizer import build_shapes_tokenizer, special_token_ids

    text = dict(TINY_TEXT if tiny else SD15_TEXT)
    tokenizer = build_shapes_tokenizer(max_length=text["max_position_embeddings"])
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=TINY_CONTROL_WIDTHS if tiny else SD15_CONTROL_WIDTHS)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text, **special_token_ids(tokenizer)))
    with torch.no_grad():  # zero convolutions would make the control a no-op: small random ones, unit-gain / 10
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1 / math.sqrt(conv.weight[0].numel()))
    cast = {torch.float16: "half", torch.float32: "float", torch.bfloat16: "bfloat16"}[dtype]  # (diffusers' `to`
    # warns on any dtype, wrongly: "modules that should be kept in float32: []")
    for m in (unet, controlnet, vae, text_encoder):
        getattr(m.to(device), cast)().eval().requires_grad_(False)
    return Models(tokenizer, text_encoder, unet, controlnet, vae, dict(SD15_SCHEDULER),
                  TINY_RESOLUTION if tiny else SD15_RESOLUTION)  # fmt: skip


def parameter_millions(models: Models) -> dict[str, float]:
    """Parameters of each network in millions, to 0.1M."""
    nets = dict(unet=models.unet, controlnet=models.controlnet, vae=models.vae, text_encoder=models.text_encoder)
    return {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in nets.items()}


def check_parameter_counts(millions: dict[str, float]) -> None:
    """At full size the networks must be SD 1.5's (a mistyped config would benchmark another model)."""
    wrong = {k: (millions[k], v) for k, v in EXPECTED_MILLIONS.items() if millions[k] != v}
    assert not wrong, f"parameter counts (M) differ from SD 1.5's (got, expected): {wrong}"


def condition_image(resolution: int, seed: int = 0) -> torch.Tensor:
    """A few coloured rectangles on black, (1, 3, H, W) in [0, 1]: a condition (its content does not change speed)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, resolution, resolution)
    side = max(4, resolution // 4)
    for _ in range(3):
        y, x = torch.randint(0, resolution - side, (2,), generator=gen).tolist()
        img[0, :, y:y + side, x:x + side] = torch.rand(3, 1, 1, generator=gen) * 0.75 + 0.25
    return img


def start_noise(models: Models, batch: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The initial latents every row gets at this batch size."""
    side = models.resolution // models.vae_scale_factor
    channels = models.unet.config.in_channels
    noise = torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))
    return noise.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(models: Models, batch: int, cfg: float) -> dict[str, int]:
    """FLOPs of one ControlNet + UNet call at the CFG batch, and of one VAE decode at `batch`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    p = next(models.unet.parameters())
    rows = 2 * batch if cfg > 1 else batch
    side = models.resolution // models.vae_scale_factor
    x = torch.zeros(rows, models.unet.config.in_channels, side, side, device=p.device, dtype=p.dtype)
    emb = torch.zeros(rows, models.tokenizer.model_max_length, models.unet.config.cross_attention_dim,
                      device=p.device, dtype=p.dtype)  # fmt: skip
    cond = torch.zeros(rows, 3, models.resolution, models.resolution, device=p.device, dtype=p.dtype)
    t = torch.tensor(500, device=p.device)
    # torch has no FLOP formula for the CPU's fused attention kernel: count attention as its matmuls there
    backend = sdpa_kernel(SDPBackend.MATH) if p.device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), backend:
        with FlopCounterMode(display=False) as step:
            down, mid = models.controlnet(x, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
            models.unet(x, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)  # fmt: skip
        with FlopCounterMode(display=False) as decode:
            models.vae.decode(x[:batch], return_dict=False)
    return {"step": int(step.get_total_flops()), "decode": int(decode.get_total_flops())}


def peak_flops(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The device's dense fp16 peak in FLOP/s and where it comes from (None: unknown)."""
    if override_tflops is not None:
        return override_tflops * 1e12, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "unknown for a CPU (--peak-tflops sets one)"
    name = torch.cuda.get_device_name(torch.device(device))
    for needles, peak in PEAKS:
        if all(n in name for n in needles):
            return peak, f"dense fp16 peak of {' '.join(needles)} ({name})"
    return None, f"unknown for {name} (--peak-tflops sets one)"


# ---------------------------------------------------------------------------------------------- the rows
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile(module: Any, mode: str) -> Any:
    return torch.compile(module, mode=mode, dynamic=False)


def make_row(row: str, models: Models, s: Settings) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                                                             Callable[[], str], Callable[[], None]]:  # fmt: skip
    """For a row: run(noise, control) -> images (B, 3, H, W) in [0, 1] on the device; a note on how it ran; and
    what frees its per-batch state."""
    from mmsynth.sample.fast_path import FastSampler, encode_prompt

    if row in ("eager", "compiled"):
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
            controlnet=models.controlnet, scheduler=models.scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        if row == "compiled":
            pipe.unet, pipe.controlnet = _compile(pipe.unet, s.compile_mode), _compile(pipe.controlnet, s.compile_mode)

        def run_pipe(noise: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
            return pipe(PROMPT, image=control, num_inference_steps=s.steps, guidance_scale=s.cfg,
                        num_images_per_prompt=len(noise), latents=noise, height=models.resolution,
                        width=models.resolution, output_type="pt").images  # fmt: skip

        note = "diffusers" if row == "eager" else f"diffusers, torch.compile mode={s.compile_mode}"
        return run_pipe, lambda: note, lambda: None

    sampler = FastSampler(models.unet, models.vae, models.scheduler(), controlnet=models.controlnet, steps=s.steps,
                          guidance_scale=s.cfg, compile_mode=s.compile_mode if row == "fast-compiled" else None)

    def run_fast(noise: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        prompt, negative = encode_prompt(models.tokenizer, models.text_encoder, PROMPT, len(noise))
        return sampler(prompt, negative, noise, control)

    def note() -> str:
        if sampler.graph_error is not None:
            return f"eager loop: graph capture failed ({sampler.graph_error[:200]})"
        return ("CUDA graph per step" if sampler.cuda_graph else "eager loop") + (
            ", channels_last" if sampler.channels_last else "") + (
            f", torch.compile mode={s.compile_mode}" if row == "fast-compiled" else "")  # fmt: skip

    return run_fast, note, sampler.release


def measure(run: Run, warmup: int, repeats: int, device: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm-up seconds, the timed runs' seconds and peak memory, and the last run's images."""
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        for _ in range(warmup):
            images = run()
        _sync(device)
        warm = time.perf_counter() - start
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            images = run()
            _sync(device)
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"warmup_seconds": warm, "run_seconds": seconds, "peak_memory_gib": peak}, images


def pixel_difference(images: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    """Largest |difference| on the 0-255 scale (None without a reference or where either is not finite)."""
    if reference is None:
        return None
    diff = float((images.float().cpu() - reference).abs().max()) * 255
    return diff if math.isfinite(diff) else None


def run_benchmark(s: Settings, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build the models, count FLOPs, time every row at every batch; the result as a JSON-able dict."""
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
    dtype = getattr(torch, s.dtype)
    if s.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every row: autotuned convolutions (tuned in the warm-up)
    built = time.perf_counter()
    models = build_models(s.tiny, s.device, dtype, s.seed)
    built = time.perf_counter() - built
    millions = parameter_millions(models)
    if not s.tiny:
        check_parameter_counts(millions)
    peak, peak_source = peak_flops(s.device, s.peak_tflops)
    flops = {}
    for b in s.batches:
        f = count_flops(models, b, s.cfg)
        floor = (s.steps * f["step"] + f["decode"]) / b / peak if peak else None
        flops[str(b)] = {**f, "floor_seconds_per_image": floor}
    control = condition_image(models.resolution).to(s.device)
    references: dict[int, torch.Tensor] = {}
    rows = []
    for row in sorted(s.rows, key=ROWS.index):  # the fast rows last: they make the modules channels_last
        try:
            run, note, release = make_row(row, models, s)
        except Exception as e:  # one broken row must not cost the others (a GPU run is one shot)
            rows += [{"row": row, "batch": b, "error": f"{type(e).__name__}: {e}"} for b in s.batches]
            continue
        for b in s.batches:
            entry: dict[str, Any] = {"row": row, "batch": b}
            noise = start_noise(models, b, s.seed, s.device, dtype)
            try:
                timing, images = measure(functools.partial(run, noise, control), s.warmup, s.repeats, s.device)
                per_image = statistics.median(timing["run_seconds"]) / b
                floor = flops[str(b)]["floor_seconds_per_image"]
                if row == "eager":
                    references[b] = images.float().cpu()
                entry.update(seconds_per_image=per_image, images_per_second=1 / per_image, **timing,
                             flop_floor_fraction=None if floor is None else floor / per_image,
                             max_pixel_difference=pixel_difference(images, references.get(b)), notes=note(),
                             error=None)  # fmt: skip
            except Exception as e:
                entry.update(error=f"{type(e).__name__}: {e}")
            release()
            rows.append(entry)
            if on_row is not None:
                on_row(entry)
        del run, release
        gc.collect()
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    result = {"environment": environment(s.device), "settings": dataclasses.asdict(s), "build_seconds": built,
              "parameters_millions": millions, "peak_flops": peak, "peak_flops_source": peak_source, "flops": flops,
              "rows": rows}  # fmt: skip
    result["goals"] = goals(result)
    return result


def environment(device: str) -> dict[str, Any]:
    """Where the numbers come from."""
    import diffusers
    import transformers

    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(torch.device(device)) if cuda else (platform.processor() or "cpu"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- reporting
def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals for each fast row, with the measured value and whether it is met (None: not measured)."""
    ok = {(r["row"], r["batch"]): r for r in result["rows"] if r.get("error") is None}
    out = []
    for fast in ("fast", "fast-compiled"):
        if fast not in result["settings"]["rows"]:
            continue
        f1, c1, f8 = ok.get((fast, 1)), ok.get(("compiled", 1)), ok.get((fast, 8))
        one = f1 and f1["seconds_per_image"]
        speedup = c1 and f1 and c1["seconds_per_image"] / f1["seconds_per_image"]
        fraction = f8 and f8["flop_floor_fraction"]
        for goal, value, met in (
            (f"{fast}: batch 1 at most 0.2 s/image", one, one is not None and one <= 0.2),
            (f"{fast}: batch 1 at least 4x faster than diffusers compiled", speedup,
             speedup is not None and speedup >= 4),
            (f"{fast}: batch 8 at 50% or more of the FLOP floor", fraction, fraction is not None and fraction >= 0.5),
        ):  # fmt: skip
            out.append({"goal": goal, "value": value, "met": met if value is not None else None})
    return out


def table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table, then the goals."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = ["row", "batch", "s/image", "images/s", "warm-up s", "peak GiB", "floor frac", "max px diff", "notes"]
    lines = []
    for r in result["rows"]:
        if r.get("error") is not None:
            lines.append([r["row"], str(r["batch"]), "error", "", "", "", "", "", r["error"][:120]])
            continue
        lines.append([r["row"], str(r["batch"]), num(r["seconds_per_image"], ".4f"), num(r["images_per_second"], ".2f"),
                      num(r["warmup_seconds"], ".2f"), num(r["peak_memory_gib"], ".2f"),
                      num(r["flop_floor_fraction"], ".3f"), num(r["max_pixel_difference"], ".4f"), r["notes"]])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *lines]]
    if result["goals"]:
        text.append("goals (not asserted; they concern the full-size run on a GPU):")
    for g in result["goals"]:
        state = {True: "met", False: "not met", None: "not measured"}[g["met"]]
        text.append(f"goal  {g['goal']}: {num(g['value'], '.3f')} ({state})")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                    help="scaled-down models, 64x64 images (default: on a CPU)")  # fmt: skip
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8; --tiny: 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --tiny: 2)")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--rows", default=None, help=f"comma-separated rows of {', '.join(ROWS)} "
                                                 "(default: eager,compiled,fast on CUDA; eager,fast on a CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row and batch (default 5; CPU: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; CPU: 1)")
    ap.add_argument("--dtype", default=None, help="float16 or float32 (default: float16 on CUDA, float32 on a CPU)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: by GPU name)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    cuda = device.startswith("cuda")
    tiny = (not cuda) if args.tiny is None else args.tiny
    rows = tuple(r.strip() for r in (args.rows or ("eager,compiled,fast" if cuda else "eager,fast")).split(","))
    if any(r not in ROWS for r in rows):
        ap.error(f"--rows: unknown row in {args.rows!r}; valid: {', '.join(ROWS)}")
    batches = tuple(int(b) for b in (args.batches or ("1,2" if tiny else "1,4,8")).split(","))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*upcast_vae.*")
    s = Settings(tiny=tiny, device=device, dtype=args.dtype or ("float16" if cuda else "float32"),
                 steps=args.steps or (2 if tiny else 20), cfg=args.cfg, batches=batches, rows=rows,
                 repeats=args.repeats or (5 if cuda else 3), warmup=args.warmup if args.warmup is not None else (
                     2 if cuda else 1), compile_mode=args.compile_mode, peak_tflops=args.peak_tflops)  # fmt: skip

    def progress(row: dict[str, Any]) -> None:
        done = row.get("error") or f"{row['seconds_per_image']:.4f} s/image"
        print(f"{row['row']} batch {row['batch']}: {done}", file=sys.stderr, flush=True)

    result = run_benchmark(s, progress)
    env = result["environment"]
    print(f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}; {'tiny' if s.tiny else 'SD 1.5'} "
          f"models {result['parameters_millions']} (M parameters), {s.dtype}, {s.steps} steps UniPC, CFG {s.cfg}; "
          f"median of {s.repeats} after {s.warmup} warm-up; peak: {result['peak_flops_source']}")  # fmt: skip
    for b, f in result["flops"].items():
        floor = f["floor_seconds_per_image"]
        print(f"batch {b}: {f['step'] / 1e12:.4g} TFLOP per step (ControlNet + UNet at the CFG batch), "
              f"{f['decode'] / 1e12:.4g} per decode; floor {'-' if floor is None else f'{floor:.4f}'} s/image")
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
