"""One t2i training step's heavy parts in float32 vs bf16 autocast, side by side in one run.

Times (best of --repeats, alternating) one forward + backward + AdamW step of a freshly built zoo UNet, and
the frozen VAE's encoding of the batch, on random inputs. Not a test: timings on shared machines are noisy;
run it on a quiet machine (pause any training run first).

    python benchmarks/train_step_precision.py                  # the shapes-v1 UNet size, batch 64, CPU
    python benchmarks/train_step_precision.py --zoo tiny --batch 8
"""

from __future__ import annotations

import argparse
import time

import torch

from mmsynth.models.zoo import ZOO_SPECS, build_unet, build_vae


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="shapes-v1", choices=sorted(ZOO_SPECS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = ZOO_SPECS[a.zoo]
    torch.manual_seed(0)
    unet = build_unet(spec, cross_attention_dim=spec.text_width)
    vae = build_vae(spec).requires_grad_(False).eval()
    opt = torch.optim.AdamW(unet.parameters())
    f = spec.resolution // spec.latent_size
    x = torch.randn(a.batch, spec.latent_channels, spec.latent_size, spec.latent_size)
    t = torch.randint(0, 1000, (a.batch,))
    text = torch.randn(a.batch, spec.max_length, spec.text_width)
    pixels = torch.rand(a.batch, 3, spec.latent_size * f, spec.latent_size * f) * 2 - 1

    def unet_step(bf16: bool):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = unet(x, t, text).sample
            (out.float() - x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        return run

    def vae_encode(bf16: bool):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                vae.encode(pixels).latent_dist.sample()

        return run

    print(f"{a.zoo} UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params), batch {a.batch}, "
          f"{torch.get_num_threads()} threads, best of {a.repeats}:")  # fmt: skip
    for name, make in (("UNet forward+backward+AdamW", unet_step), ("VAE encode", vae_encode)):
        fp32, bf16 = float("inf"), float("inf")
        for _ in range(2):  # alternate, so a background load hits both
            fp32 = min(fp32, _best(make(False), a.repeats))
            bf16 = min(bf16, _best(make(True), a.repeats))
        print(f"  {name}: float32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s (ratio {bf16 / fp32:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
