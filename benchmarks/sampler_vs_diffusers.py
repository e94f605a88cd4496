"""mmsynth's sampler vs diffusers' pipelines on the same weights, side by side in one run.

Rows (--rows, default all), each timed alternately (best of --repeats) with the same scheduler, steps, batch, CFG
and seeds, and its outputs compared:

    plain         mmsynth                      vs StableDiffusionPipeline
    controlnet    mmsynth + 1 ControlNet        vs StableDiffusionControlNetPipeline
    controlnet2   mmsynth + 2 ControlNets       vs StableDiffusionControlNetPipeline with a MultiControlNetModel
    adapter       mmsynth + 1 T2I-Adapter       vs StableDiffusionAdapterPipeline
    adapter-cost  mmsynth + 1 T2I-Adapter       vs mmsynth alone (the adapter's own cost: ratio ~1)

Columns: seconds of each side, ratio (first / second; < 1 means the first is faster), the largest pixel difference
(same weights: ~0; none for adapter-cost, whose sides differ by design), and each side's peak memory.

Peak memory is the peak growth of the process's memory during one run, measured after the timing (warm), each side
on its own: on CUDA `torch.cuda.max_memory_allocated` above what was allocated before the run; on Linux CPUs the
peak resident set size (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) above the resident size
before the run, after `malloc_trim` returned the heap's free memory to the system, so that reused free pages do
not hide the run's allocations. It counts everything the run touches (activations, the control's condition and
features, the output), at page granularity; null elsewhere. Not a test: timings on shared machines are noisy.

The control networks are the bundle's own components when it has them (`controlnet_canny`, `adapter_depth`);
otherwise fresh ones built for the bundle's UNet (`mmsynth.models.zoo.build_controlnet` / `build_adapter`; the
ControlNet's zero convolutions get small random weights so that the control changes the output). Speed does not
depend on the weights. An adapter needs cross-attention in every down block of the UNet but the last: on a UNet
without it (`--model tiny`'s) the adapter rows are skipped with that reason.

    python benchmarks/sampler_vs_diffusers.py                 # the shipped zoo (models/shapes-v1)
    python benchmarks/sampler_vs_diffusers.py --model tiny     # random tiny bundle, no weights needed
    python benchmarks/sampler_vs_diffusers.py --model DIR --device cuda --rows plain,controlnet --json out.json

Measured on a busy 2-core CPU (two training jobs sharing it; torch 2.13 CPU, diffusers 0.42.1; fresh control
networks: shapes-v1 ships none yet), `nice -n 10 python benchmarks/sampler_vs_diffusers.py --threads 1` (the zoo,
DDIM, 25 steps, batch 8, CFG 5, best of 3):

    row           first                  second                             first s  second s  ratio  cpu ratio  max px diff  first MiB  second MiB
    plain         mmsynth                diffusers SDPipeline               6.513    6.409     1.016  1.015      0            46.7       54.5
    controlnet    mmsynth+ControlNet     diffusers SDControlNetPipeline     9.005    8.814     1.022  0.986      0            50.6       53.5
    controlnet2   mmsynth+2 ControlNets  diffusers SDControlNetPipeline[2]  11.898   10.992    1.082  1.072      0            54.5       54.7
    adapter       mmsynth+adapter        diffusers SDAdapterPipeline        6.251    6.505     0.961  0.968      1            53.9       45.7
    adapter-cost  mmsynth+adapter        mmsynth                            5.883    6.311     0.932  0.934      -            53.9       46.7

Ratios within about +-8% are noise there: the same run's time moved that much between repeats, and a profile of
controlnet2 (10 steps, 440 ms a step) put the work outside the networks at 3-4 ms a step for mmsynth and 2.5 for
diffusers, and the UNet and ControlNet times equal on both sides (within that noise). An adapter costs nothing measurable per step (its features are computed once). Repeated
memory readings of one run differ by up to ~8 MiB at this size (allocator state): the peaks agree within that.
With torch's default 2 threads on that busy CPU the same work took 3.6 to 27.6 s from one repeat to the next
(threads wait on each other while the other jobs hold the cores): there, use --threads 1 or an idle machine.
"""  # noqa: E501

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image

from mmsynth.models import Bundle
from mmsynth.models.shipped import resolve_model
from mmsynth.models.zoo import build_adapter, build_controlnet, tiny_bundle
from mmsynth.sample import ControlNet, GenerationRequest, T2IAdapterControl, sample
from mmsynth.sample.schedulers import make_scheduler

ROWS = ("plain", "controlnet", "controlnet2", "adapter", "adapter-cost")
PROMPT = "two red circles left of a blue square"
Run = Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every row shares."""

    scheduler: str = "ddim"
    steps: int = 25
    batch: int = 8
    cfg: float = 5.0
    repeats: int = 3
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Timing:
    """Best of the repeats: wall seconds, and the process's CPU seconds (all threads; steadier than wall time on
    a shared CPU, where other jobs stretch the wall clock)."""

    wall: float = float("inf")
    cpu: float = float("inf")


def time_alternately(runs: dict[str, Run], repeats: int, device: str) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Best times of each run over `repeats` rounds, the runs taking turns within a round (so that a slow spell
    of a shared machine hits both sides), and each run's last output."""
    best = {k: Timing() for k in runs}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in runs.items():
                _sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                outputs[name] = fn()
                _sync(device)
                b = best[name]
                b.wall, b.cpu = min(b.wall, time.perf_counter() - wall), min(b.cpu, time.process_time() - cpu)
    return best, outputs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_method(device: str) -> str | None:
    """How `peak_memory_mib` measures on this device (None: it cannot, and reports null)."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated above the allocation before the run"
    if _can_reset_peak_rss():
        return "peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS before the run, after malloc_trim"
    return None


def peak_memory_mib(fn: Run, device: str) -> float | None:
    """The peak memory one run of `fn` adds to the process, in MiB (see the module docstring); None where it
    cannot be measured honestly (not CUDA and not Linux)."""
    gc.collect()
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        if not _can_reset_peak_rss():
            return None
        _malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") > 0
    except (OSError, KeyError):
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: free pages may stay resident, reading low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------------- the rows
def condition_image(resolution: int, seed: int) -> np.ndarray:
    """A few coloured rectangles on black: a condition image (its content does not change the speed)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((resolution, resolution, 3), np.uint8)
    side = max(4, resolution // 4)
    for _ in range(3):
        y, x = rng.integers(0, resolution - side, 2)
        img[y:y + side, x:x + side] = rng.integers(64, 256, 3)
    return img


def fresh_controlnet(bundle: Bundle, seed: int, device: str) -> torch.nn.Module:
    """A ControlNet for the bundle's UNet whose zero convolutions have small random weights."""
    torch.manual_seed(seed)
    net = build_controlnet(bundle.unet, bundle.vae_scale_factor)
    with torch.no_grad():
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.05)
    return net.to(device).eval()


def adapter_unsupported(bundle: Bundle) -> str | None:
    """Why the bundle's UNet cannot take T2I-Adapter features (None: it can)."""
    blocks = list(bundle.unet.config.down_block_types)
    if any("CrossAttn" not in b for b in blocks[:-1]):
        return (f"a T2I-Adapter needs cross-attention in every down block of the UNet but the last; this UNet has "
                f"{', '.join(blocks)}")
    return None


def control_networks(bundle: Bundle, device: str) -> dict[str, torch.nn.Module]:
    """Two ControlNets and (where the UNet takes one) an adapter: the bundle's own components first, fresh ones
    where it has none."""
    extras = bundle.extras
    nets: dict[str, torch.nn.Module] = {}
    nets["controlnet_canny"] = extras["controlnet_canny"] if "controlnet_canny" in extras else (
        fresh_controlnet(bundle, 1, device))  # fmt: skip
    nets["controlnet_second"] = fresh_controlnet(bundle, 2, device)
    if adapter_unsupported(bundle) is None:
        if "adapter_depth" in extras:
            nets["adapter_depth"] = extras["adapter_depth"]
        else:
            torch.manual_seed(3)
            nets["adapter_depth"] = build_adapter(bundle.unet, bundle.vae_scale_factor).to(device).eval()
    return nets


def _pixels(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def row_runs(bundle: Bundle, s: Settings) -> tuple[dict[str, tuple[Run, Run, str, str]], dict[str, str]]:
    """Per row: (first run, second run, first's name, second's name); and the rows that cannot run, with why."""
    nets = control_networks(bundle, s.device)
    b = dataclasses.replace(bundle, extras=nets)  # the bundle with these networks as its components
    r = bundle.resolution
    cond_a, cond_b = condition_image(r, 0), condition_image(r, 1)
    request = GenerationRequest(prompt=PROMPT, n=s.batch, seed=0, steps=s.steps, cfg=s.cfg, scheduler=s.scheduler)
    common = dict(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)  # fmt: skip

    def pipeline(cls: type, **extra: Any) -> Any:
        pipe = cls(scheduler=make_scheduler(s.scheduler, b.scheduler), **common, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def theirs(pipe: Any, **kwargs: Any) -> Run:
        def run() -> np.ndarray:
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(s.batch)]
            out = pipe(PROMPT, num_images_per_prompt=s.batch, num_inference_steps=s.steps, guidance_scale=s.cfg,
                       generator=gens, height=r, width=r, output_type="np", **kwargs)  # fmt: skip
            return _pixels(out.images)

        return run

    def ours(make_controls: Callable[[], list[Any]]) -> Run:
        return lambda: sample(b, request, make_controls(), progress=False).images

    plain = ours(list)
    rows: dict[str, tuple[Run, Run, str, str]] = {
        "plain": (plain, theirs(pipeline(StableDiffusionPipeline)), "mmsynth", "diffusers SDPipeline"),
        "controlnet": (
            ours(lambda: [ControlNet(model="controlnet_canny", image=cond_a)]),
            theirs(pipeline(StableDiffusionControlNetPipeline, controlnet=nets["controlnet_canny"]),
                   image=Image.fromarray(cond_a)),
            "mmsynth+ControlNet", "diffusers SDControlNetPipeline"),
        "controlnet2": (
            ours(lambda: [ControlNet(model="controlnet_canny", image=cond_a),
                          ControlNet(model="controlnet_second", image=cond_b)]),
            theirs(pipeline(StableDiffusionControlNetPipeline,
                            controlnet=[nets["controlnet_canny"], nets["controlnet_second"]]),
                   image=[Image.fromarray(cond_a), Image.fromarray(cond_b)]),
            "mmsynth+2 ControlNets", "diffusers SDControlNetPipeline[2]"),
    }  # fmt: skip
    skipped: dict[str, str] = {}
    why = adapter_unsupported(bundle)
    if why is None:
        adapter = nets["adapter_depth"]
        cond = cond_a if int(adapter.config.in_channels) == 3 else np.asarray(Image.fromarray(cond_a).convert("L"))
        adapted = ours(lambda: [T2IAdapterControl(model="adapter_depth", image=cond)])
        rows["adapter"] = (adapted, theirs(pipeline(StableDiffusionAdapterPipeline, adapter=adapter),
                                           image=Image.fromarray(cond)),
                           "mmsynth+adapter", "diffusers SDAdapterPipeline")  # fmt: skip
        rows["adapter-cost"] = (adapted, plain, "mmsynth+adapter", "mmsynth")
    else:
        skipped["adapter"] = skipped["adapter-cost"] = why
    return rows, skipped


def run_rows(bundle: Bundle, rows: list[str], s: Settings,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time, compare and measure the memory of each row (`on_row` sees each as it is done: a zoo run takes many
    minutes on a CPU); the result as a JSON-able dict."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
    runs, skipped = row_runs(bundle, s)
    memory: dict[int, float | None] = {}  # by run, measured once (adapter-cost reuses the adapter and plain runs)
    out_rows, out_skipped = [], []
    for name in rows:
        if name in skipped:
            out_skipped.append({"row": name, "reason": skipped[name]})
            continue
        first, second, first_name, second_name = runs[name]
        best, outputs = time_alternately({"first": first, "second": second}, s.repeats, s.device)
        for fn in (first, second):
            if id(fn) not in memory:
                memory[id(fn)] = peak_memory_mib(fn, s.device)
        diff = None
        if name != "adapter-cost":
            diff = int(np.abs(outputs["first"].astype(int) - outputs["second"].astype(int)).max())
        out_rows.append({
            "row": name, "first": first_name, "second": second_name,
            "seconds": {"first": best["first"].wall, "second": best["second"].wall},
            "ratio": best["first"].wall / best["second"].wall,
            "cpu_seconds": {"first": best["first"].cpu, "second": best["second"].cpu},
            "cpu_ratio": best["first"].cpu / best["second"].cpu,
            "max_pixel_difference": diff,
            "peak_memory_mib": {"first": memory[id(first)], "second": memory[id(second)]},
        })  # fmt: skip
        if on_row is not None:
            on_row(out_rows[-1])
    return {
        **dataclasses.asdict(s), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "peak_memory_method": memory_method(s.device), "rows": out_rows, "skipped": out_skipped,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    head = ["row", "first", "second", "first s", "second s", "ratio", "cpu ratio", "max px diff", "first MiB",
            "second MiB"]
    lines = [[r["row"], r["first"], r["second"], num(r["seconds"]["first"], ".3f"), num(r["seconds"]["second"], ".3f"),
              num(r["ratio"], ".3f"), num(r["cpu_ratio"], ".3f"), num(r["max_pixel_difference"], "d"),
              num(r["peak_memory_mib"]["first"], ".1f"), num(r["peak_memory_mib"]["second"], ".1f")]
             for r in result["rows"]]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *lines]]
    text += [f"skipped {r['row']}: {r['reason']}" for r in result["skipped"]]
    return "\n".join(text)


def load_bundle(model: str | None) -> Bundle:
    """'tiny': a random tiny bundle; else a bundle directory (default: the shipped zoo)."""
    return tiny_bundle(0) if model == "tiny" else Bundle.from_pretrained(resolve_model(model))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle dir, or 'tiny' for a random tiny bundle (default: the zoo)")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a CPU other jobs share, 1 avoids threads waiting on "
                         "each other and gives far steadier times")  # fmt: skip
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--json", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows):
        ap.error(f"--rows: unknown row in {args.rows!r}; valid: {', '.join(ROWS)}")

    warnings.filterwarnings("ignore", message="The decode_latents method is deprecated")  # the adapter pipeline's
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = Settings(scheduler=args.scheduler, steps=args.steps, batch=args.batch, cfg=args.cfg,
                        repeats=args.repeats, device=args.device)  # fmt: skip
    bundle = load_bundle(args.model).to(args.device)
    def progress(row: dict[str, Any]) -> None:
        print(f"{row['row']}: ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)

    result = {"model": args.model or "models/shapes-v1", **run_rows(bundle, rows, settings, progress)}
    print(f"best of {args.repeats}; ratio = first s / second s (wall; cpu ratio: process CPU time); peak memory: "
          f"{result['peak_memory_method']}")
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
