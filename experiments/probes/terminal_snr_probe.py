"""Does a bundle's noisiest training step still show the image? Its UNet's x0 guess there, from the training noise
and from the pure noise that sampling starts from.

    python experiments/probes/terminal_snr_probe.py [--model models/shapes-v1] [--n 256] [--split test]

For n scenes, the latents are noised as training noises them at each probed timestep (x_t = sqrt(a) x0 +
sqrt(1 - a) eps) and, beside that, replaced by pure noise (what a sampler starts from at its first step). For
each, the UNet's x0 guess (from its epsilon or v output) under the scene's caption and under the empty caption
is scored by its mean squared error to the true latents and by its spatial correlation with them (each channel's
mean removed: where things are, not how bright). A schedule whose alpha_bar at T is not zero lets the x0 guess
from training noise correlate with the truth even with the empty caption: the UNet then learns to read the layout
from the noise instead of the caption, and from pure noise it has nothing to read (Lin et al. 2024). At zero
terminal SNR both rows of t = T are the same pure noise. No sampling, so it takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse

TIMESTEPS = (999, 961, 900, 800)  # 961: the first of 25 DDIM steps with "leading" spacing


def layout_correlation(guess, truth):
    """Per image, the cosine between guess and truth with each channel's spatial mean removed, averaged."""
    g = (guess - guess.mean((2, 3), keepdim=True)).flatten(1)
    t = (truth - truth.mean((2, 3), keepdim=True)).flatten(1)
    return float(((g * t).sum(1) / (g.norm(dim=1) * t.norm(dim=1)).clamp_min(1e-8)).mean())


def probe(model: str, n: int = 256, split: str = "test", seed: int = 0,
          timesteps: tuple[int, ...] = TIMESTEPS) -> list[dict]:  # fmt: skip
    """Rows of (t, alpha_bar, start: "training noise" or "pure noise", caption: "scene" or "empty", mse, corr)."""
    import numpy as np
    import torch
    from diffusers import DDPMScheduler

    from mmsynth.data.captions import captions
    from mmsynth.data.render import render
    from mmsynth.data.scene import sample_scene
    from mmsynth.models import Bundle
    from mmsynth.models.tokenizer import tokenize_padded
    from mmsynth.sample.controls import Step

    b = Bundle.from_pretrained(model)
    scenes = [sample_scene(split, i, seed) for i in range(n)]
    pixels = torch.from_numpy(np.stack([render(s, b.resolution) for s in scenes])).permute(0, 3, 1, 2)
    alphas = DDPMScheduler.from_config(b.scheduler.config).alphas_cumprod
    kind = b.scheduler.config.prediction_type
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        shift = getattr(b.vae.config, "shift_factor", None) or 0.0
        latents = (b.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean - shift) * b.vae.config.scaling_factor
        texts = {"scene": [captions(s, 1)[0] for s in scenes], "empty": [""] * n}
        hidden = {k: b.text_encoder(tokenize_padded(b.tokenizer, v, return_tensors="pt").input_ids)[0]
                  for k, v in texts.items()}  # fmt: skip
        for t in timesteps:
            a = float(alphas[t])
            for start in ("training noise", "pure noise"):
                noise = torch.randn(latents.shape, generator=generator)
                x = a**0.5 * latents + (1 - a) ** 0.5 * noise if start == "training noise" else noise
                for caption, h in hidden.items():
                    out = b.unet(x, torch.full((n,), t), encoder_hidden_states=h).sample
                    guess = Step(0, 1, torch.tensor(t), a, a).to_x0(x, out, kind)
                    rows.append({"t": t, "alpha_bar": a, "start": start, "caption": caption,
                                 "mse": float(((guess - latents) ** 2).mean()),
                                 "corr": layout_correlation(guess, latents)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-v1", help="a text-to-image bundle folder")
    p.add_argument("--n", type=int, default=256, help="scenes (default 256)")
    p.add_argument("--split", default="test", help="Shapes split the scenes come from (default test)")
    p.add_argument("--seed", type=int, default=0, help="scene and noise seed (default 0)")
    a = p.parse_args(argv)
    if a.n < 2:
        p.error(f"--n must be >= 2, got {a.n}")
    print(f"n={a.n} scenes of split '{a.split}'; x0 guess: mean squared error to the true latents, layout correlation")
    print("   t  alpha_bar  start           caption   mse     corr")
    for r in probe(a.model, a.n, a.split, a.seed):
        print(f"{r['t']:4d}  {r['alpha_bar']:.5f}    {r['start']:<15} {r['caption']:<8}  {r['mse']:.4f}  "
              f"{r['corr']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
