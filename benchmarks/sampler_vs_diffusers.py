"""mmsynth's sampler vs diffusers' StableDiffusionPipeline on the same weights, side by side in one run.

Same scheduler, steps, batch, CFG and seeds; the two are timed alternately (best of --repeats) and
their outputs compared. Prints the time ratio (mmsynth / diffusers; < 1 means mmsynth is faster)
and the largest pixel difference. Not a test: timings on shared machines are noisy.

    python benchmarks/sampler_vs_diffusers.py                 # the shipped zoo (models/shapes-v1)
    python benchmarks/sampler_vs_diffusers.py --model tiny     # random tiny bundle, no weights needed
    python benchmarks/sampler_vs_diffusers.py --model DIR --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from mmsynth.models import Bundle
from mmsynth.models.shipped import resolve_model
from mmsynth.models.zoo import tiny_bundle
from mmsynth.sample import GenerationRequest, sample
from mmsynth.sample.schedulers import make_scheduler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="bundle dir, or 'tiny' for a random tiny bundle (default: the zoo)")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)

    bundle = tiny_bundle(0) if args.model == "tiny" else Bundle.from_pretrained(resolve_model(args.model))
    bundle = bundle.to(args.device)
    prompt = "two red circles left of a blue square"
    request = GenerationRequest(prompt=prompt, n=args.batch, seed=0, steps=args.steps, cfg=args.cfg,
                                scheduler=args.scheduler)  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet,
        scheduler=make_scheduler(args.scheduler, bundle.scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def ours() -> np.ndarray:
        return sample(bundle, request, progress=False).images

    def theirs() -> np.ndarray:
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
        out = pipe([prompt] * args.batch, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=gens,
                   height=bundle.resolution, width=bundle.resolution, output_type="np")  # fmt: skip
        return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)

    times: dict[str, list[float]] = {"mmsynth": [], "diffusers": []}
    outputs = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in (("mmsynth", ours), ("diffusers", theirs)):
                t = time.perf_counter()
                outputs[name] = fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    diff = int(np.abs(outputs["mmsynth"].astype(int) - outputs["diffusers"].astype(int)).max())
    result = {
        "model": args.model or "models/shapes-v1",
        "scheduler": args.scheduler, "steps": args.steps, "batch": args.batch, "cfg": args.cfg,
        "device": args.device, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "best_seconds": best, "ratio_mmsynth_over_diffusers": best["mmsynth"] / best["diffusers"],
        "max_pixel_difference": diff,
    }  # fmt: skip
    print(f"mmsynth {best['mmsynth']:.3f} s, diffusers {best['diffusers']:.3f} s (best of {args.repeats}): "
          f"ratio {result['ratio_mmsynth_over_diffusers']:.3f}; max pixel difference {diff}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
