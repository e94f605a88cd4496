"""Fidelity metrics on constructed sets where the answer is known."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from mmsynth.data import render, sample_scene
from mmsynth.errors import InputError
from mmsynth.evaluate.fidelity import (
    clip_image_features,
    diversity,
    features_of,
    frechet_distance,
    kernel_distance,
    load_folder,
    precision_recall,
)
from mmsynth.io import save_image


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    return clip_image_features(CLIPVisionModelWithProjection(cfg), name="tinyclip")


def _renders(split: str, n: int, start: int = 0) -> torch.Tensor:
    arr = np.stack([render(sample_scene(split, i), 32) for i in range(start, start + n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _flat(color, n: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    arr = np.clip(np.array(color)[None, None, None] + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def test_frechet_and_kid_rank_same_distribution_below_a_different_one(feats):
    a, b = _renders("train", 40), _renders("val", 40)
    other = _flat((200, 30, 30), 40)
    assert frechet_distance(a, b, feats) < frechet_distance(a, other, feats)
    kid_same, _ = kernel_distance(a, b, feats, subsets=10)
    kid_diff, _ = kernel_distance(a, other, feats, subsets=10)
    assert kid_same < kid_diff


def test_precision_recall_and_diversity(feats):
    a = features_of(_renders("train", 30), feats)
    p, r = precision_recall(a, a.clone())
    assert p == 1.0 and r == 1.0
    far = a + 1000.0
    assert precision_recall(a, far) == (0.0, 0.0)
    same = features_of(_flat((0, 0, 200), 5), feats)
    assert diversity([a]) > diversity([same])  # varied scenes are more diverse than noisy flat images
    with pytest.raises(InputError, match="two or more"):
        diversity([a[:1]])


def test_folder_loading_resizes_and_rejects_bad_folders(tmp_path, feats):
    for i in range(3):
        save_image(render(sample_scene("test", i), 64 if i else 48), tmp_path / f"{i}.png")
    imgs = load_folder(tmp_path, 32)
    assert imgs.shape == (3, 3, 32, 32) and imgs.dtype == torch.uint8
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_folder(tmp_path / "empty", 32)
    with pytest.raises(InputError, match="does not exist"):
        load_folder(tmp_path / "missing", 32)
    with pytest.raises(InputError, match="at least 2"):
        frechet_distance(imgs[:1], imgs, feats)
