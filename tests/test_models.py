"""Model bundle format, Shapes tokenizer and zoo configs."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from mmsynth.data.captions import captions
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle
from mmsynth.models.tokenizer import build_shapes_tokenizer, unknown_words, warn_unknown_words
from mmsynth.models.zoo import SHAPES_V1, TINY, count_parameters, random_bundle, tiny_bundle


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "tiny"
    bundle = tiny_bundle(seed=3)
    bundle.save_pretrained(path)
    return bundle, path


def test_tokenizer_knows_every_caption_word_and_special_ids():
    tok = build_shapes_tokenizer()
    for i in range(300):
        for text in captions(sample_scene("train", i)):
            ids = tok(text).input_ids
            assert tok.unk_token_id not in ids, text
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert len(ids) <= tok.model_max_length
    assert tok.pad_token_id == tok.eos_token_id == len(tok) - 1


def test_unknown_words_are_named_in_a_warning(caplog):
    tok = build_shapes_tokenizer()
    with caplog.at_level(logging.WARNING, logger="mmsynth.models.tokenizer"):
        found = warn_unknown_words(tok, "Two RED zebras left of a blue square, and a dog")
    assert found == ["zebras", "dog"]
    assert "zebras" in caplog.text and "dog" in caplog.text
    assert unknown_words(tok, "two red circles left of a blue square") == []
    ids = tok("a red zebra").input_ids
    assert ids.count(tok.unk_token_id) == 1


def test_clip_text_config_uses_tokenizer_special_ids():
    b = tiny_bundle()
    cfg = b.text_encoder.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        b.tokenizer.bos_token_id,
        b.tokenizer.eos_token_id,
        b.tokenizer.pad_token_id,
    )
    assert cfg.vocab_size == len(b.tokenizer)
    # pooled output is taken at the end-of-text token, not at a padding position
    enc = b.tokenizer(
        ["a red circle"], padding="max_length", max_length=cfg.max_position_embeddings, return_tensors="pt"
    )
    with torch.no_grad():
        out = b.text_encoder(enc.input_ids)
    eos_pos = int((enc.input_ids[0] == cfg.eos_token_id).nonzero()[0])
    assert torch.allclose(out.pooler_output[0], out.last_hidden_state[0, eos_pos])


def test_zoo_geometry_and_sizes():
    b = tiny_bundle()
    assert b.vae_scale_factor == 4 and b.latent_channels == 4
    assert b.resolution == TINY.resolution
    assert count_parameters(b.unet) < 1_000_000
    x = torch.randn(2, 3, TINY.resolution, TINY.resolution)
    with torch.no_grad():
        z = b.vae.encode(x).latent_dist.mean
    assert z.shape == (2, 4, TINY.resolution // 4, TINY.resolution // 4)
    assert SHAPES_V1.latent_size == 16 and SHAPES_V1.vae_scale_factor == 4


def test_bundle_round_trip_is_exact(saved):
    bundle, path = saved
    loaded = Bundle.from_pretrained(path)
    for name, module in bundle.modules().items():
        a, b = module.state_dict(), loaded.modules()[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert loaded.tokenizer("a red circle").input_ids == bundle.tokenizer("a red circle").input_ids
    assert type(loaded.scheduler) is type(bundle.scheduler)
    assert loaded.scheduler.config.beta_schedule == bundle.scheduler.config.beta_schedule


def test_diffusers_stable_diffusion_pipeline_loads_and_runs_our_bundle(saved):
    from diffusers import StableDiffusionPipeline

    _bundle, path = saved
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "two red circles left of a blue square",
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    img = out.images[0]
    assert img.shape == (TINY.resolution, TINY.resolution, 3)
    assert np.isfinite(img).all()


def test_save_in_fp16_halves_weights_and_keeps_memory_models(tmp_path):
    b = tiny_bundle()
    b.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert b.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {torch.float16}
    loaded = Bundle.from_pretrained(tmp_path / "half", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16 and next(loaded.text_encoder.parameters()).dtype == torch.float16
    loaded = Bundle.from_pretrained(tmp_path / "half")  # float32 by default, whatever is stored
    assert {next(m.parameters()).dtype for m in loaded.modules().values()} == {torch.float32}
    assert torch.equal(next(loaded.unet.parameters()), next(b.unet.parameters()).half().float())


def test_save_is_atomic_and_replaces(tmp_path):
    dest = tmp_path / "b"
    tiny_bundle(seed=0).save_pretrained(dest)
    tiny_bundle(seed=1).save_pretrained(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp or backup dirs left behind
    loaded = Bundle.from_pretrained(dest)
    fresh = tiny_bundle(seed=1)
    assert torch.equal(next(loaded.unet.parameters()), next(fresh.unet.parameters()))


def test_loading_errors_name_the_problem(saved, tmp_path):
    _bundle, path = saved
    with pytest.raises(InputError, match="does not exist"):
        Bundle.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "no_unet"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(InputError, match=r"no unet/ component: train it with `mmsynth train t2i`"):
        Bundle.from_pretrained(broken)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    weights = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="cannot load its vae"):
        Bundle.from_pretrained(corrupt)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(path, bad_config)
    (bad_config / "unet" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot load its unet"):
        Bundle.from_pretrained(bad_config)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_random_bundle_is_seeded():
    a, b = random_bundle(TINY, seed=5), random_bundle(TINY, seed=5)
    for x, y in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(x, y)


def test_a_deepened_unet_computes_what_it_grew_from_and_its_new_layers_learn(tmp_path):
    from diffusers import UNet2DConditionModel

    from mmsynth.models.grow import ZERO_INIT, attention_depth, deepen_attention

    unet = tiny_bundle(seed=2).unet
    grown = deepen_attention(unet, (1, 2, 3))
    assert attention_depth(unet) == (1, 1, 1) and attention_depth(grown) == (1, 2, 3)
    assert count_parameters(grown) > count_parameters(unet)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(grown(x, t, text).sample, unet(x, t, text).sample)
    new = [n for n, _ in grown.named_parameters() if n not in dict(unet.named_parameters())]
    assert any(n.startswith("mid_block.") for n in new) and any(n.startswith("up_blocks.0.") for n in new)
    grown(x, t, text).sample.pow(2).mean().backward()
    zeroed = [p for n, p in grown.named_parameters() if n in new and any(z in n for z in ZERO_INIT)]
    assert zeroed and all(p.abs().sum() == 0 for p in zeroed)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in zeroed)  # an identity start, not a dead one
    grown.save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert attention_depth(back) == (1, 2, 3) and deepen_attention(back, (1, 2, 3)) is back
    with pytest.raises(InputError, match="one layer count per UNet level"):
        deepen_attention(unet, (2, 2))
    with pytest.raises(InputError, match="grown, not cut"):
        deepen_attention(grown, (1, 1, 3))


def test_a_deepened_vision_tower_embeds_images_as_before_and_leaves_the_text_tower(tmp_path):
    from transformers import CLIPModel

    from mmsynth.models.grow import VISION_ZERO_INIT, deepen_vision_tower

    clip = tiny_bundle(seed=3).clip
    old = clip.config.vision_config.num_hidden_layers
    grown = deepen_vision_tower(clip, old + 2)
    assert (grown.config.vision_config.num_hidden_layers, clip.config.vision_config.num_hidden_layers) == (old + 2, old)
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 1]])
    with torch.no_grad():
        a, b = clip(input_ids=ids, pixel_values=x), grown(input_ids=ids, pixel_values=x)
    torch.testing.assert_close(b.image_embeds, a.image_embeds)  # new layers start as identities
    assert torch.equal(b.text_embeds, a.text_embeds)
    grown(input_ids=ids, pixel_values=x).image_embeds.pow(2).sum().backward()
    new = [p for n, p in grown.named_parameters()
           if f"layers.{old}." in n and n.startswith("vision_model") and any(z in n for z in VISION_ZERO_INIT)]
    assert new and all(p.abs().sum() == 0 for p in new) and any(p.grad.abs().sum() > 0 for p in new)
    grown.save_pretrained(tmp_path / "clip")
    back = CLIPModel.from_pretrained(tmp_path / "clip")
    assert deepen_vision_tower(back, old + 2) is back
    with pytest.raises(InputError, match="grown, not cut"):
        deepen_vision_tower(grown, old)


def test_a_refined_vision_tower_sees_an_image_as_the_old_one_saw_it_upsampled(tmp_path):
    from transformers import CLIPModel

    from mmsynth.models.grow import refine_vision_patches
    from mmsynth.models.zoo import projected

    clip = tiny_bundle(seed=3).clip.eval()
    old = clip.config.vision_config.patch_size
    refined = refine_vision_patches(clip, old // 2).eval()
    assert refined.config.vision_config.patch_size == old // 2 and clip.config.vision_config.patch_size == old
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    with torch.no_grad():
        fine = projected(refined.get_image_features(pixel_values=x))
        coarse = projected(clip.get_image_features(pixel_values=upsampled, interpolate_pos_encoding=True))
    torch.testing.assert_close(fine, coarse, atol=1e-5, rtol=1e-4)
    a, b = clip.text_model.state_dict(), refined.text_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the UNet's text encoder is untouched
    refined.save_pretrained(tmp_path / "clip")
    back = CLIPModel.from_pretrained(tmp_path / "clip")
    assert refine_vision_patches(back, old // 2) is back
    with pytest.raises(InputError, match="must divide the vision tower's patch size"):
        refine_vision_patches(clip, 3)


def test_controlnet_and_adapter_builders_fit_a_factor_4_unet():
    """The zoo's VAE has factor 4: the ControlNet's condition encoder and the adapter's unshuffle must bring the
    condition image to latent size, so that diffusers' own pipelines run them (STACK.md)."""
    import torch

    from mmsynth.models.zoo import SHAPES_V1, build_adapter, build_controlnet, build_unet, tiny_bundle

    b = tiny_bundle(0)
    controlnet = build_controlnet(b.unet, b.vae_scale_factor)
    assert controlnet.config.conditioning_embedding_out_channels == (16, 32, 96)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, b.tokenizer.model_max_length, 32)
    with torch.no_grad():
        down, mid = controlnet(x, 10, context, controlnet_cond=torch.rand(2, 3, 32, 32), return_dict=False)
        assert all(float(d.abs().max()) == 0.0 for d in [*down, mid])  # zero convolutions: no effect at first
        plain = b.unet(x, 10, context).sample
        torch.testing.assert_close(b.unet(x, 10, context, down_block_additional_residuals=down,
                                          mid_block_additional_residual=mid).sample, plain)
    unet = build_unet(SHAPES_V1, 128)  # every down block with cross-attention, as the zoo's
    adapter = build_adapter(unet, SHAPES_V1.vae_scale_factor)
    features = adapter(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(64, 16, 16), (96, 8, 8), (128, 4, 4)]
    out = unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 48, 128), down_intrablock_additional_residuals=features)
    assert out.sample.shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="cross-attention in every down block"):
        build_adapter(b.unet, b.vae_scale_factor)  # the tiny UNet's first block has none
