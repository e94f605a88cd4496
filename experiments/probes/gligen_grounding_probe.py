"""Does a GLIGEN snapshot use its grounding? Its denoising loss with the scene's own boxes against no boxes and
against another scene's boxes.

    python experiments/probes/gligen_grounding_probe.py runs/gligen/exports/step_0002000/gligen \
        [--model models/shapes-v1] [--n 128] [--caption empty|true]

For n test scenes, each image is noised once per timestep band (the same latents, noise and timestep for every
condition) and denoised by the base UNet carrying the snapshot's grounding layers under: its own boxes and phrases,
no grounding (every slot the learned null, the unconditional branch), and the boxes and phrases of the next scene.
Per band it prints the mean relative loss gap (loss(other) - loss(own)) / loss(own) and how often the own layout
denoises better: layers that ground sit at gap > 0, wins > 0.5; layers the UNet ignores at gap 0, wins 0.5 (the
diffusion-classifier reading, as in denoiser_relation_probe.py). `--caption empty` (default) denoises without a
caption, where the boxes are all the model has; `true` with the scene's caption. No sampling: a minute on a CPU.
"""

from __future__ import annotations

import argparse

import torch

BANDS = ((0, 200), (200, 400), (400, 600), (600, 800), (800, 1000))


def main() -> None:
    from diffusers import DDPMScheduler

    from mmsynth.data.captions import captions
    from mmsynth.data.render import render
    from mmsynth.data.scene import sample_scene
    from mmsynth.models.bundle import Bundle
    from mmsynth.models.components import apply_layers
    from mmsynth.models.zoo import build_gligen_unet
    from mmsynth.sample.gligen import phrase_embeddings
    from mmsynth.sample.layout import MAX_BOXES, scene_layout
    from mmsynth.sample.sampler import encode_text

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("layers", help="a GLIGEN export folder (RUN/exports/step_N/gligen or RUN/final/gligen)")
    p.add_argument("--model", default="models/shapes-v1")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--caption", choices=("empty", "true"), default="empty")
    args = p.parse_args()

    b = Bundle.from_pretrained(args.model)
    unet = build_gligen_unet(b.unet)
    apply_layers(unet, args.layers, b.unet.state_dict(), args.layers).eval()
    noise_scheduler = DDPMScheduler.from_config(b.scheduler.config)
    r = b.resolution
    scenes = [sample_scene("test", 50_000 + i) for i in range(args.n + 1)]

    def grounding(scene_list: list, on: bool) -> dict[str, torch.Tensor]:
        dim = unet.config.cross_attention_dim
        boxes, emb, masks = torch.zeros(len(scene_list), MAX_BOXES, 4), torch.zeros(len(scene_list), MAX_BOXES,
                                                                                    dim), torch.zeros(len(scene_list),
                                                                                                      MAX_BOXES)
        for i, sc in enumerate(scene_list):
            layout = scene_layout(sc)
            bx, ph = layout.boxes, layout.phrases
            e = phrase_embeddings(b.tokenizer, b.text_encoder, ph)
            boxes[i, :len(bx)] = torch.tensor(bx)
            emb[i, :len(ph)] = e
            masks[i, :len(bx)] = 1.0 if on else 0.0
        return {"boxes": boxes, "positive_embeddings": emb, "masks": masks}

    own_scenes, other_scenes = scenes[:-1], scenes[1:]
    pixels = torch.stack([torch.from_numpy(render(s, r)).permute(2, 0, 1).float() / 127.5 - 1 for s in own_scenes])
    with torch.no_grad():
        latents = b.vae.encode(pixels).latent_dist.mean * b.vae.config.scaling_factor
        prompts = [captions(s, 1)[0] if args.caption == "true" else "" for s in own_scenes]
        context = encode_text(b, prompts)
    conditions = {"own": grounding(own_scenes, True), "none": grounding(own_scenes, False),
                  "other": grounding(other_scenes, True)}
    g = torch.Generator().manual_seed(0)
    print(f"{args.layers}: n={args.n}, caption {args.caption}; gap = (loss(x) - loss(own)) / loss(own)")
    print("band       | none: gap   wins | other: gap  wins")
    for lo, hi in BANDS:
        t = torch.randint(lo, hi, (args.n,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        losses = {}
        with torch.no_grad():
            for name, gl in conditions.items():
                pred = unet(noisy, t, encoder_hidden_states=context, cross_attention_kwargs={"gligen": gl}).sample
                losses[name] = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        cells = []
        for name in ("none", "other"):
            gap = ((losses[name] - losses["own"]) / losses["own"]).mean().item()
            wins = (losses["own"] < losses[name]).float().mean().item()
            cells.append(f"{gap:+.4f}  {wins:.3f}")
        print(f"{lo:4d}-{hi:<5d} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    main()
