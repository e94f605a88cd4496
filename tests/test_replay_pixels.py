"""The same request gives the same pixels across a refactor: requests recorded with their images, replayed exactly.

tests/data/replay/ holds a set of request JSON files covering the sampler's paths (schedulers, CFG on and off,
negative prompts, img2img, inpainting with blended latents and with the inpainting UNet, universal guidance,
reconstruction from x_T, prompt-swap editing with attention replay, Attend-and-Excite, layout attention, best-of)
on the shipped zoo and on a tiny random model, and the pixels they gave when recorded. Each test replays one request
from its JSON and compares the pixels exactly on the CPU kind they were recorded on (at most 1/255 elsewhere, where
float kernels may round differently).

Recorded with `MMSYNTH_RECORD_REPLAY=1 python -m pytest tests/test_replay_pixels.py` (only before a change whose
behaviour must stay the same: recording after it proves nothing).

Changed on purpose since the recording (each entry's pixels re-recorded alone, after the structural change had
replayed it exactly):
- `*__edit_attention` (issue 50, faithfulness): prompt-to-prompt (`source-cross-attention`) now replaces only the
  conditional branch's cross-attention maps; the unconditional branch keeps its own, as in the reference code. The
  old pixels differed by at most 25/255 on the zoo (mean 0.42) and 1/255 on the tiny model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsynth.sample import GenerationRequest, sample

DATA = Path(__file__).parent / "data" / "replay"
RECORD = os.environ.get("MMSYNTH_RECORD_REPLAY") == "1"
ZOO = Path(__file__).resolve().parents[1] / "models" / "shapes-v1"


def _platform() -> str:
    """What decides the float rounding of a CPU run: torch's version and the vector unit its kernels use."""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"


def _tiny_dir(root: Path) -> Path:
    from mmsynth.models.zoo import tiny_bundle

    path = root / "tiny"
    if not path.exists():
        tiny_bundle(0).save_pretrained(path)
    return path


def _requests(resolution: int) -> dict[str, GenerationRequest]:
    """The recorded set, built through the public API (recording only; replays read the JSON)."""
    from mmsynth.data import render, sample_scene
    from mmsynth.sample import Img2Img
    from mmsynth.sample.attend_excite import AttendExcite
    from mmsynth.sample.controls import Schedule
    from mmsynth.sample.edit import edit_request
    from mmsynth.sample.inpaint import BlendedInpaint
    from mmsynth.sample.layout_attention import LayoutAttention
    from mmsynth.sample.universal import UniversalGuidance

    r = resolution
    source = render(sample_scene("test", 5), r)
    target = render(sample_scene("test", 6), r)
    mask = np.zeros((r, r), np.uint8)
    mask[r // 4 : 3 * r // 4, r // 4 : 3 * r // 4] = 255
    prompt = "a red circle left of a blue square"
    reqs = {f"t2i_{s}": GenerationRequest(prompt=prompt, scheduler=s, steps=6, seed=3, n=2)
            for s in ("ddim", "dpmpp-2m", "unipc", "euler")}  # fmt: skip
    reqs["cfg1_negative"] = GenerationRequest(prompt=[prompt, "three green stars"], negative_prompt="a red circle",
                                              steps=5, cfg=1.0, n=2, seed=7)  # fmt: skip
    reqs["negative_cfg7_eta"] = GenerationRequest(prompt=prompt, negative_prompt="a yellow star", steps=5, cfg=7.0,
                                                  eta=0.5, seed=11)  # fmt: skip
    reqs["img2img"] = GenerationRequest(prompt=prompt, steps=8, seed=2,
                                        controls=[Img2Img(image=source, strength=0.6).to_dict()])  # fmt: skip
    for unet in ("base", "auto"):
        reqs[f"inpaint_{unet}"] = GenerationRequest(prompt=prompt, steps=6, seed=4, controls=[BlendedInpaint(
            image=source, mask=mask, unet=unet, resample=2).to_dict()])  # fmt: skip
    reqs["palette_guide"] = GenerationRequest(prompt=prompt, steps=4, seed=5, controls=[UniversalGuidance(
        guide="palette", params={"target": target}, s0=1.0, k=2, m=1).to_dict()])  # fmt: skip
    reqs["edit_attention"] = edit_request(source, "a red circle", "a blue circle", steps=6, cfg=5.0,
                                          keep_attention=0.5, cross_attention=0.5, strength=0.8)  # fmt: skip
    reqs["attend_excite"] = GenerationRequest(prompt=prompt, steps=4, seed=8, controls=[AttendExcite(
        tokens=["circle", "square"], schedule=Schedule(end=0.5)).to_dict()])  # fmt: skip
    reqs["layout_attention"] = GenerationRequest(prompt=prompt, steps=4, seed=9, controls=[LayoutAttention(
        boxes=[[0.0, 0.2, 0.5, 0.8], [0.5, 0.2, 1.0, 0.8]], phrases=["red circle", "blue square"]).to_dict()])
    reqs["best_of"] = GenerationRequest(prompt=prompt, steps=3, seed=10, best_of=2)
    return reqs


MODELS = ("zoo", "tiny")
CASES = sorted(p.stem for p in DATA.glob("*.json")) if DATA.is_dir() else []


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from mmsynth.models import Bundle

    root = tmp_path_factory.mktemp("replay")
    return {"zoo": Bundle.from_pretrained(ZOO), "tiny": Bundle.from_pretrained(_tiny_dir(root))}


@pytest.mark.skipif(not RECORD, reason="records the replay set only with MMSYNTH_RECORD_REPLAY=1")
def test_record(bundles):
    DATA.mkdir(parents=True, exist_ok=True)
    for old in DATA.glob("*.json"):
        old.unlink()
    pixels = {}
    for model, bundle in bundles.items():
        for name, request in _requests(bundle.resolution).items():
            key = f"{model}__{name}"
            (DATA / f"{key}.json").write_text(request.to_json() + "\n", encoding="utf-8")
            pixels[key] = sample(bundle, request, progress=False).images
    np.savez_compressed(DATA / "pixels.npz", **pixels)
    (DATA / "platform.txt").write_text(_platform() + "\n", encoding="utf-8")


@pytest.mark.skipif(RECORD or not CASES, reason="nothing recorded yet")
@pytest.mark.parametrize("key", CASES)
def test_a_recorded_request_gives_the_same_pixels(key, bundles):
    model = key.split("__")[0]
    request = GenerationRequest.from_json((DATA / f"{key}.json").read_text(encoding="utf-8"))
    images = sample(bundles[model], request, progress=False).images
    with np.load(DATA / "pixels.npz") as recorded:
        expected = recorded[key]
    assert images.shape == expected.shape
    diff = np.abs(images.astype(int) - expected.astype(int)).max()
    same_platform = (DATA / "platform.txt").read_text(encoding="utf-8").strip() == _platform()
    assert diff == 0 if same_platform else diff <= 1, f"max pixel difference {diff} ({_platform()})"


def test_the_replay_set_is_complete():
    if RECORD:
        pytest.skip("recording")
    names = {f"{m}__{n}" for m in MODELS for n in _requests(32)}
    assert set(CASES) == names, f"recorded {sorted(CASES)}, expected {sorted(names)}"
    assert json.loads((DATA / f"{CASES[0]}.json").read_text())["format"] == "mmsynth.request/1"
