"""Paint-by-Example through the one sampler: the exemplar's one token replaces the text, the learned unconditional
token guides, the 9-channel UNet reads the masked scene and the keep mask; against diffusers' PaintByExamplePipeline
on the same tiny random networks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import PaintByExamplePipeline
from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.models import Bundle
from mmsynth.models.exemplar_encoder import ExemplarEncoder, exemplar_encoder_from_clip
from mmsynth.models.zoo import TINY, build_unet
from mmsynth.sample import GenerationRequest, PaintByExample, make_scheduler, sample
from mmsynth.sample.paint_by_example import PBE_ENCODER, PBE_UNET

ATOL = 1e-4


@pytest.fixture(scope="module")
def pbe(bundle):
    """The tiny bundle with a random Paint-by-Example UNet and encoder; its VAE made deterministic (a posterior of
    ~0 variance), since diffusers' pipeline samples the masked scene's latents where mmsynth takes their mean."""
    torch.manual_seed(0)
    encoder = exemplar_encoder_from_clip(bundle.clip, width=48)
    unet = build_unet(TINY, cross_attention_dim=48)
    unet = type(unet).from_config({**{k: v for k, v in unet.config.items() if not k.startswith("_")},
                                   "in_channels": 2 * TINY.latent_channels + 1})
    vae = bundle.vae.__class__.from_config(bundle.vae.config)
    vae.load_state_dict(bundle.vae.state_dict())
    with torch.no_grad():
        c = TINY.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -40.0  # log-variance: std e^-20
    return dataclasses.replace(bundle, vae=vae, extras={PBE_UNET: unet, PBE_ENCODER: encoder})


@pytest.fixture(scope="module")
def scene_mask_exemplar(bundle):
    r = bundle.resolution
    rng = np.random.default_rng(1)
    scene = (rng.random((r, r, 3)) * 255).astype(np.uint8)
    mask = np.zeros((r, r), np.uint8)
    mask[8:24, 4:20] = 255
    exemplar = (rng.random((40, 24, 3)) * 255).astype(np.uint8)  # another size and aspect than the encoder's input
    return scene, mask, exemplar


@pytest.mark.parametrize(("cfg", "n"), [(5.0, 2), (1.0, 1)])
def test_paint_by_example_matches_diffusers(pbe, scene_mask_exemplar, cfg, n):
    scene, mask, exemplar = scene_mask_exemplar
    encoder = pbe.extras[PBE_ENCODER]
    req = GenerationRequest(steps=4, cfg=cfg, seed=3, n=n)
    ours = sample(pbe, req, [PaintByExample(image=scene, mask=mask, exemplar=exemplar, paste=False)],
                  progress=False)
    theirs_encoder = PaintByExampleImageEncoder(encoder.config, proj_size=48)
    theirs_encoder.load_state_dict(encoder.state_dict())  # the same layout and names: weights move unchanged
    pipe = PaintByExamplePipeline(vae=pbe.vae, image_encoder=theirs_encoder.eval(), unet=pbe.extras[PBE_UNET],
                                  scheduler=make_scheduler("ddim", pbe.scheduler), safety_checker=None,
                                  feature_extractor=encoder.processor(), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=Image.fromarray(scene), mask_image=Image.fromarray(mask), example_image=Image.fromarray(exemplar),
               num_inference_steps=4, guidance_scale=cfg, num_images_per_prompt=n,
               generator=[torch.Generator().manual_seed(3 + i) for i in range(n)], output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def test_the_exemplar_steers_and_paste_keeps_the_outside(pbe, scene_mask_exemplar):
    scene, mask, exemplar = scene_mask_exemplar
    req = GenerationRequest(steps=3, cfg=4.0, seed=1)
    a = sample(pbe, req, [PaintByExample(image=scene, mask=mask, exemplar=exemplar)], progress=False)
    b = sample(pbe, req, [PaintByExample(image=scene, mask=mask, exemplar=255 - exemplar)], progress=False)
    assert not torch.allclose(a.latents, b.latents, atol=1e-4)
    outside = mask == 0
    assert np.array_equal(a.images[0][outside], scene[outside])  # paste-back: kept pixels bit for bit


def test_the_encoder_saves_and_loads_as_a_bundle_component(pbe, tmp_path):
    saved = pbe.save_pretrained(tmp_path / "m")
    loaded = Bundle.from_pretrained(saved)
    encoder = loaded.extras[PBE_ENCODER]
    assert isinstance(encoder, ExemplarEncoder)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), pbe.extras[PBE_ENCODER](x))


def test_bad_paint_by_example_requests_are_clear_errors(pbe, bundle, scene_mask_exemplar):
    scene, mask, exemplar = scene_mask_exemplar
    with pytest.raises(InputError, match="needs an exemplar image"):
        PaintByExample(image=scene, mask=mask)
    with pytest.raises(InputError, match="no paint_by_example_unet or paint_by_example_encoder component"):
        sample(bundle, GenerationRequest(steps=2), [PaintByExample(image=scene, mask=mask, exemplar=exemplar)],
               progress=False)
    with pytest.raises(InputError, match="reads no text"):
        sample(pbe, GenerationRequest(prompt="a red circle", steps=2),
               [PaintByExample(image=scene, mask=mask, exemplar=exemplar)], progress=False)
    with pytest.raises(InputError, match="mask is 16x16 but the image is 32x32"):
        PaintByExample(image=scene, mask=mask[:16, :16], exemplar=exemplar)


def test_the_encoder_with_a_mapper_equals_diffusers_encoder():
    """A tower of 4+ layers gets a mapper block (one per five layers, as diffusers counts): same outputs."""
    from transformers import CLIPVisionConfig

    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24)
    ours = ExemplarEncoder(config).eval()
    assert len(ours.mapper.blocks) == 1
    theirs = PaintByExampleImageEncoder(config, proj_size=24).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours.uncond_vector, theirs(x, return_uncond_vector=True)[1])


def test_generate_paints_an_exemplar_from_the_cli(pbe, scene_mask_exemplar, tmp_path):
    from mmsynth.cli.main import main

    scene, mask, exemplar = scene_mask_exemplar
    model = pbe.save_pretrained(tmp_path / "m")
    for name, arr in (("scene", scene), ("mask", mask), ("obj", exemplar)):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    out = tmp_path / "o"
    assert main(["generate", "--model", str(model), "--init-image", str(tmp_path / "scene.png"), "--mask",
                 str(tmp_path / "mask.png"), "--exemplar", str(tmp_path / "obj.png"), "-n", "1", "--steps", "2",
                 "--out", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(out / "images" / "0000.png"))
    assert np.array_equal(image[mask == 0], scene[mask == 0])
    assert main(["generate", "--model", str(model), "--init-image", str(tmp_path / "scene.png"), "--exemplar",
                 str(tmp_path / "obj.png"), "--out", str(tmp_path / "o2")]) == 2  # no --mask: one-line error


def test_the_reordered_unet_computes_what_the_inpainting_unet_computes(bundle):
    """paint_by_example_unet: SD inpainting's (latents, repaint mask, masked latents) -> Paint-by-Example's
    (latents, masked latents, keep mask), same function (checked with the mask constant near the centre, where the
    zero padding of the input convolution does not reach)."""
    from mmsynth.train.recipes.inpaint import inpainting_unet
    from mmsynth.train.recipes.paint_by_example import paint_by_example_unet

    torch.manual_seed(0)
    sd = inpainting_unet(bundle.unet).eval()
    with torch.no_grad():
        sd.conv_in.weight.normal_(0, 0.1)
    pbe = paint_by_example_unet(sd).eval()
    x, masked = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    repaint = torch.ones(1, 1, 8, 8)
    context = torch.randn(1, 5, sd.config.cross_attention_dim)
    with torch.no_grad():
        a = sd.conv_in(torch.cat([x, repaint, masked], 1))
        b = pbe.conv_in(torch.cat([x, masked, 1 - repaint], 1))
        torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
        assert sd(torch.cat([x, repaint, masked], 1), 10, context).sample.shape == (1, 4, 8, 8)


def test_training_masks_grow_the_box_or_outline_it_and_always_cover_the_object():
    from mmsynth.train.recipes.paint_by_example import PaintByExampleOptions, exemplar_mask

    box = (0.3, 0.3, 0.6, 0.5)
    for bezier in (0.0, 1.0):
        for seed in range(5):
            m = exemplar_mask(box, 64, np.random.default_rng(seed), PaintByExampleOptions(bezier_rate=bezier))
            assert m.shape == (64, 64) and set(np.unique(m)) <= {0.0, 1.0}
            assert m[int(0.4 * 64), int(0.45 * 64)] == 1  # the object's centre is always repainted
            assert m.sum() < 64 * 64


def test_the_recipe_trains_and_exports_both_components(tmp_path):
    from mmsynth.cli.main import main
    from mmsynth.models.zoo import tiny_bundle
    from mmsynth.train.recipes.inpaint import inpainting_unet

    base = tiny_bundle(seed=1)
    base.extras["unet_inpainting"] = inpainting_unet(base.unet)
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    rc = main(["train", "paint-by-example", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
               "--no-progress", "--set", f"options.base={tmp_path / 'base'}", "--set", "sample_every=2", "--set",
               "checkpoint_every=1", "--set", "warmup_steps=0", "--set", "lr_schedule=constant", "--set",
               "options.sample_steps=2", "--set", "num_workers=0"])  # fmt: skip
    assert rc == 0
    exported = Bundle.from_pretrained(out / "final")
    assert exported.extras[PBE_UNET].config.in_channels == 9
    assert (out / "final" / PBE_UNET / "lora.safetensors").is_file()  # a LoRA + its changed layers, not a copy
    assert isinstance(exported.extras[PBE_ENCODER], ExemplarEncoder)
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())
