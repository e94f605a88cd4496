"""SDXL through the one sampler: two text encoders, pooled text and time ids, its ControlNets and its refiner, each
against diffusers' own SDXL pipeline on a tiny random model with SDXL's architecture (same weights, scheduler and
seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from mmsynth.cli.main import main
from mmsynth.models import Bundle
from mmsynth.models.zoo import build_controlnet, tiny_xl_bundle
from mmsynth.sample import ControlNet, GenerationRequest, Img2Img, Schedule, make_scheduler, sample

PROMPT = "two red circles left of a blue square"
ATOL = 1e-4  # float32 parity on latents


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return tiny_xl_bundle(seed=0).save_pretrained(tmp_path_factory.mktemp("xl") / "tiny-xl")


@pytest.fixture(scope="module")
def xl(xl_dir):
    return Bundle.from_pretrained(xl_dir)


def _gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _pipe(cls, bundle, scheduler: str, **extra):
    pipe = cls(vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2,
               tokenizer=bundle.tokenizer, tokenizer_2=bundle.tokenizer_2, unet=bundle.unet,
               scheduler=make_scheduler(scheduler, bundle.scheduler), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_sdxl_folder_saves_and_loads_as_diffusers_sdxl(xl_dir, xl):
    index = json.loads((xl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][1].endswith("Projection")
    assert xl.is_xl and xl.force_zeros_for_empty_prompt and type(xl.text_encoder_2).__name__ == (
        "CLIPTextModelWithProjection")
    StableDiffusionXLPipeline.from_pretrained(xl_dir)  # diffusers reads what we wrote, no dtype needed
    assert index["tokenizer_2"] == ["transformers", "PreTrainedTokenizerFast"]  # a name transformers 4 knows too


def test_an_sdxl_folder_without_model_index_is_still_sdxl(xl_dir, tmp_path):
    import shutil

    copy = tmp_path / "xl"
    shutil.copytree(xl_dir, copy)
    (copy / "model_index.json").unlink()
    loaded = Bundle.from_pretrained(copy)
    assert loaded.is_xl and loaded.text_encoder_2 is not None


@pytest.mark.parametrize(("scheduler", "negative", "cfg", "n"),
                         [("ddim", "", 4.0, 2), ("euler", "a blue square", 5.0, 1), ("unipc", "", 1.0, 1)])
def test_sdxl_text_to_image_matches_diffusers(xl, scheduler, negative, cfg, n):
    req = GenerationRequest(prompt=PROMPT, negative_prompt=negative, scheduler=scheduler, steps=4, cfg=cfg, seed=3,
                            n=n)
    ours = sample(xl, req, progress=False)
    pipe = _pipe(StableDiffusionXLPipeline, xl, scheduler, force_zeros_for_empty_prompt=True,
                 add_watermarker=False)
    ref = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=4, guidance_scale=cfg,
               num_images_per_prompt=n, generator=_gens(3, n), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def test_sdxl_empty_negative_prompt_is_zeros_not_encoded_text(xl):
    req = GenerationRequest(prompt=PROMPT, steps=3, cfg=4.0, seed=1)
    zeros = sample(xl, req, progress=False).latents
    import dataclasses

    encoded = sample(dataclasses.replace(xl, force_zeros_for_empty_prompt=False), req, progress=False).latents
    assert not torch.allclose(zeros, encoded, atol=1e-4)


def test_sdxl_controlnet_matches_diffusers(xl):
    import dataclasses

    torch.manual_seed(4)
    net = build_controlnet(xl.unet, xl.vae_scale_factor)
    with torch.no_grad():  # the zero convolutions would make the comparison vacuous
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.3)
    bundle = dataclasses.replace(xl, extras={"controlnet_xl": net})
    cond = (np.random.default_rng(0).random((32, 32, 3)) > 0.5).astype(np.uint8) * 255
    req = GenerationRequest(prompt=PROMPT, steps=4, cfg=4.0, seed=2)
    ours = sample(bundle, req, [ControlNet(model="controlnet_xl", image=cond, schedule=Schedule(scale=0.8))],
                  progress=False)
    pipe = _pipe(StableDiffusionXLControlNetPipeline, bundle, "ddim", controlnet=net,
                 force_zeros_for_empty_prompt=True, add_watermarker=False)
    ref = pipe(PROMPT, image=Image.fromarray(cond), num_inference_steps=4, guidance_scale=4.0, generator=_gens(2, 1),
               output_type="latent", controlnet_conditioning_scale=0.8).images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)
    assert not torch.allclose(ours.latents, sample(bundle, req, progress=False).latents, atol=1e-3)


def test_the_sdxl_refiner_refines_like_diffusers_img2img(tmp_path, gradient_image):
    refiner = Bundle.from_pretrained(tiny_xl_bundle(seed=5, refiner=True).save_pretrained(tmp_path / "refiner"))
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    req = GenerationRequest(prompt=PROMPT, negative_prompt="a blue square", steps=5, cfg=4.0, seed=6)
    ours = sample(refiner, req, [Img2Img(image=gradient_image, strength=0.5)], progress=False)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoder_2, tokenizer=None,
        tokenizer_2=refiner.tokenizer_2, unet=refiner.unet, scheduler=make_scheduler("ddim", refiner.scheduler),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, negative_prompt="a blue square", image=Image.fromarray(gradient_image), strength=0.5,
               num_inference_steps=5, guidance_scale=4.0, generator=_gens(6, 1), output_type="latent").images
    torch.testing.assert_close(ours.latents, ref, atol=ATOL, rtol=1e-3)


def test_generate_runs_an_sdxl_folder_from_the_cli(xl_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(xl_dir), "--prompt", PROMPT, "-n", "1", "--steps", "2", "--out",
                 str(out), "--quiet"]) == 0
    assert np.asarray(Image.open(out / "images" / "0000.png")).shape == (32, 32, 3)
