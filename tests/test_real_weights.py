"""Weights users own: where a model comes from (folder, single file, hub id), precision, LoRAs, and the provenance
every PNG carries. Tiny random models stand in for real checkpoints (nothing can be downloaded here)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsynth.cli.main import main
from mmsynth.errors import InputError
from mmsynth.models import Bundle
from mmsynth.models.sources import model_hash, resolve_source
from mmsynth.sample import GenerationRequest, sample

sys.path.insert(0, str(Path(__file__).parent))
from ldm_checkpoint import save_sd1_single_file, unet_keys, vae_keys


@pytest.fixture(scope="module")
def model_dir(bundle, tmp_path_factory):
    return bundle.save_pretrained(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def single_file(bundle, tmp_path_factory):
    return save_sd1_single_file(bundle, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """The exit code of the CLI (argparse's own errors exit, ours return 2) and what it printed to stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ where a model comes from


def test_a_mistyped_local_path_is_not_sent_to_the_hub_and_names_the_nearest_folder(model_dir):
    typo = model_dir.parent / "tinyy"
    with pytest.raises(InputError, match=r"does not exist \(did you mean .*tiny'"):
        resolve_source(typo)
    with pytest.raises(InputError, match="does not exist"):
        resolve_source("no_such_folder/at_all/model")


def test_a_hub_id_without_a_network_fails_in_one_line_quickly(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(InputError, match=r"not in the hub cache .*HF_HUB_OFFLINE is set"):
        resolve_source("someone/some-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(InputError, match="cannot reach the Hugging Face Hub"):
        resolve_source("someone/some-model")
    assert time.monotonic() - start < 30  # not a minute of retries


def test_a_single_file_checkpoint_loads_with_a_local_config_and_samples_like_its_folder(bundle, model_dir,
                                                                                      single_file):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    # the test's writer of the original layout is the exact inverse of diffusers' own converters
    for module, keys, convert in ((bundle.unet, unet_keys, convert_ldm_unet_checkpoint),
                                  (bundle.vae, vae_keys, convert_ldm_vae_checkpoint)):
        converted = convert(keys(module), dict(module.config))
        assert converted.keys() == module.state_dict().keys()
    loaded = Bundle.from_pretrained(single_file, config=model_dir)
    request = GenerationRequest(prompt="a red circle", n=2, steps=3, seed=4)
    ours = sample(loaded, request, progress=False).images
    assert np.array_equal(ours, sample(bundle, request, progress=False).images)


def test_a_single_file_without_its_configs_says_how_to_give_them_offline(single_file, tmp_path, capsys):
    with pytest.raises(InputError, match="without a network give --config DIR"):
        Bundle.from_pretrained(single_file)
    junk = tmp_path / "weights.txt"
    junk.write_text("not a model")
    code, err = _run(["generate", "--model", str(junk), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is a file but not a checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize(("key", "found"), [("control_model.time_embed.0.weight", "controlnet"),
                                           ("double_blocks.0.img_attn.norm.key_norm.scale", "flux-schnell")])
def test_a_single_file_of_another_architecture_is_refused_naming_it(tmp_path, key, found):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(4)}, str(path))
    with pytest.raises(InputError, match=f"is a '{found}' checkpoint; supported single files: v1, v2, xl_base"):
        Bundle.from_pretrained(path)


def test_generate_runs_a_single_file_from_the_cli(model_dir, single_file, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(single_file), "--config", str(model_dir), "--prompt", "a red circle",
                 "-n", "1", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    request = json.loads((out / "requests" / "0000.json").read_text())
    assert request["model_hash"] == model_hash(single_file)


def test_model_hashes_are_short_sha256_and_change_with_the_weights(single_file, model_dir, tmp_path):
    import hashlib

    assert model_hash(single_file) == hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]
    folder_hash = model_hash(model_dir)
    assert isinstance(folder_hash, str) and len(folder_hash) == 10
    other = tmp_path / "other.safetensors"
    other.write_bytes(single_file.read_bytes()[:-1] + b" ")
    assert model_hash(other) != model_hash(single_file)
    assert model_hash("someone/some-model") is None


# ------------------------------------------------------------------------------------------ precision and device


def test_dtype_defaults_and_fp16_on_the_cpu_falls_back_with_a_warning(caplog):
    from mmsynth.cli.model_options import resolve_dtype

    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("fp16", "cpu") == torch.float32
    assert "fp16 on the CPU" in caplog.text


def test_a_missing_device_and_a_bad_dtype_are_one_line_errors(model_dir, tmp_path, capsys):
    code, err = _run(["generate", "--model", str(model_dir), "--device", "cuda:7", "--out", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and "not available on this machine" in err and "Traceback" not in err
    code, err = _run(["generate", "--model", str(model_dir), "--dtype", "fp8", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "fp8" in err


def test_bf16_generation_on_the_cpu_writes_images_and_its_replay_keeps_bf16(model_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(model_dir), "--dtype", "bf16", "--prompt", "a red circle", "-n", "1",
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    image = np.asarray(Image.open(out / "images" / "0000.png"))
    assert image.std() > 0 and json.loads((out / "request.json").read_text())["dtype"] == "bf16"
    again = tmp_path / "again"
    assert main(["generate", "--replay", str(out / "images" / "0000.png"), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again / "images" / "0000.png")), image)
    fp32 = tmp_path / "fp32"
    assert main(["generate", "--model", str(model_dir), "--prompt", "a red circle", "-n", "1", "--steps", "2",
                 "--out", str(fp32), "--quiet"]) == 0
    assert not np.array_equal(np.asarray(Image.open(fp32 / "images" / "0000.png")), image)  # bf16 really ran


# ------------------------------------------------------------------------------------------ provenance in the PNG


def test_every_png_carries_its_request_and_a1111_parameters_and_replays_from_the_png_alone(model_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["generate", "--model", str(model_dir), "--prompt", "a red circle", "--negative-prompt", "blue",
                 "-n", "2", "--steps", "3", "--seed", "7", "--out", str(out), "--quiet"]) == 0
    with Image.open(out / "images" / "0001.png") as img:
        info = dict(img.info)
    request = json.loads(info["mmsynth.request"])
    assert request["seed"] == 8 and request["height"] == request["width"] == 32 and request["n"] == 1
    assert request["model_hash"] == model_hash(model_dir)
    prompt, negative, pairs = info["parameters"].split("\n")
    assert prompt == "a red circle" and negative == "Negative prompt: blue"
    assert pairs.startswith("Steps: 3, Sampler: DDIM, CFG scale: 5, Seed: 8, Size: 32x32, Model hash: ")
    # the PNG alone (copied away from its folder) regenerates the same pixels
    lone = tmp_path / "copied.png"
    lone.write_bytes((out / "images" / "0001.png").read_bytes())
    again = tmp_path / "again"
    assert main(["generate", "--replay", str(lone), "--out", str(again), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(again / "images" / "0000.png")),
                          np.asarray(Image.open(out / "images" / "0001.png")))


def test_replaying_a_png_without_a_request_is_a_clear_error(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.png")
    code, err = _run(["generate", "--replay", str(tmp_path / "plain.png"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "carries no mmsynth request" in err


# ------------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_dir(bundle, tmp_path_factory):
    """A random LoRA on the tiny UNet's attention, saved in diffusers' format; and the UNet with it applied."""
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(bundle.unet)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True)
    return folder, unet


def test_a_lora_fuses_at_its_scale_and_is_recorded_for_replay(bundle, model_dir, lora_dir, tmp_path):
    import dataclasses

    folder, unet_with_lora = lora_dir
    request = GenerationRequest(prompt="a red circle", n=1, steps=3, seed=2)
    expected = sample(dataclasses.replace(bundle, unet=unet_with_lora), request, progress=False).images
    base = sample(bundle, request, progress=False).images
    assert not np.array_equal(expected, base)
    out = tmp_path / "o"
    weights = folder / "pytorch_lora_weights.safetensors"
    assert main(["generate", "--model", str(model_dir), "--lora", f"{weights}:1", "--prompt", "a red circle", "-n",
                 "1", "--steps", "3", "--seed", "2", "--out", str(out), "--quiet"]) == 0
    got = np.asarray(Image.open(out / "images" / "0000.png"))
    assert np.abs(got.astype(int) - expected[0].astype(int)).max() <= 1
    recorded = json.loads((out / "request.json").read_text())
    assert recorded["loras"] == [{"path": str(weights), "scale": 1.0}]
    assert 'Lora: "pytorch_lora_weights:1"' in Image.open(out / "images" / "0000.png").info["parameters"]
    zero = tmp_path / "zero"
    assert main(["generate", "--model", str(model_dir), "--lora", f"{folder}:0", "--prompt", "a red circle", "-n",
                 "1", "--steps", "3", "--seed", "2", "--out", str(zero), "--quiet"]) == 0
    assert np.abs(np.asarray(Image.open(zero / "images" / "0000.png")).astype(int) - base[0]).max() <= 1


def test_a_lora_is_refused_where_a_control_samples_another_unet(model_dir, lora_dir, tmp_path, capsys):
    import dataclasses

    from mmsynth.models import Bundle
    from mmsynth.train.recipes.inpaint import inpainting_unet

    b = Bundle.from_pretrained(model_dir)
    b = dataclasses.replace(b, extras={"unet_inpainting": inpainting_unet(b.unet)})
    model = b.save_pretrained(tmp_path / "with_inpainting")
    r = b.resolution
    Image.fromarray(np.zeros((r, r, 3), np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((r, r), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, err = _run(["generate", "--model", str(model), "--lora", str(lora_dir[0]), "--init-image",
                      str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "x", "--out",
                      str(tmp_path / "o")], capsys)
    assert code == 2 and "samples its 'unet_inpainting' component" in err


def test_a_lora_for_another_base_is_refused_naming_the_mismatch(model_dir, tmp_path, capsys):
    import dataclasses

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mmsynth.models.zoo import TINY, random_bundle

    other = random_bundle(dataclasses.replace(TINY, unet_channels=(32, 48, 64)), seed=3).unet
    other.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "other", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(other)),
        safe_serialization=True)
    code, err = _run(["generate", "--model", str(model_dir), "--lora", str(tmp_path / "other"), "--prompt", "x",
                      "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not fit this model" in err and "size mismatch for" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
