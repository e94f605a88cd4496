"""The denoiser seam: a network that is not a diffusers UNet, in pixel space and without a text encoder, samples
through the one loop, with classifier-free guidance over an image-embedding condition a control gives."""

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from mmsynth.errors import InputError
from mmsynth.models.bundle import Bundle
from mmsynth.models.denoiser import Denoiser, ModelInputs
from mmsynth.sample import GenerationRequest, sample
from mmsynth.sample.controls import Control

EMBED = 8


class ToyPixelDenoiser(torch.nn.Module, Denoiser):
    """A few convolutions on RGB pixels, conditioned on one image-embedding token (Paint-by-Example's shape)."""

    latent_channels = 3
    scale_factor = 1
    sample_size = 16
    prediction_type = "epsilon"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.embed = torch.nn.Linear(EMBED, 16)
        self.time = torch.nn.Linear(1, 16)
        self.conv_out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        cond = self.embed(inputs.context[:, 0]) + self.time(t.float().reshape(1, 1) / 1000)
        return self.conv_out(torch.nn.functional.silu(self.conv_in(x) + cond[:, :, None, None]))


@dataclass(kw_only=True)
class ImageEmbedding(Control):
    """The context of every branch: the exemplar's embedding in the conditional one, a null (zeros) otherwise."""

    name: ClassVar[str] = "toy-image-embedding"
    embedding: list[float] = field(default_factory=lambda: [1.0] * EMBED)

    def inputs(self, ctx: Any, step: Any, branch: Any, latents: torch.Tensor) -> ModelInputs:
        e = torch.tensor(self.embedding, dtype=latents.dtype).reshape(1, 1, EMBED).repeat(latents.shape[0], 1, 1)
        return ModelInputs(context=e if branch.name == "cond" else torch.zeros_like(e))


@pytest.fixture(scope="module")
def toy() -> Bundle:
    return Bundle(tokenizer=None, text_encoder=None, vae=None, unet=ToyPixelDenoiser().eval(),
                  scheduler=DDIMScheduler(num_train_timesteps=1000))


def _by_hand(model: ToyPixelDenoiser, embedding: list[float], cfg: float, steps: int, seed: int, n: int) -> np.ndarray:
    """The guided DDIM loop written out: eps = eps(null) + cfg * (eps(embedding) - eps(null))."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    x = randn_tensor((n, 3, 16, 16), generator=gens)
    e = torch.tensor(embedding).reshape(1, 1, EMBED).repeat(n, 1, 1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = (model(x, t, ModelInputs(context=c)) for c in (torch.zeros_like(e), e))
            x = scheduler.step(uncond + cfg * (cond - uncond), t, x, eta=0.0).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def test_a_pixel_space_denoiser_samples_with_cfg_over_an_image_embedding(toy):
    embedding = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.25, 1.5]
    request = GenerationRequest(steps=5, cfg=3.0, seed=4, n=2)
    result = sample(toy, request, [ImageEmbedding(embedding=embedding)], progress=False)
    assert result.images.shape == (2, 16, 16, 3)
    expected = _by_hand(toy.unet, embedding, 3.0, 5, 4, 2)
    assert np.abs(result.images.astype(int) - expected.astype(int)).max() <= 1
    other = sample(toy, request, [ImageEmbedding(embedding=[0.0] * EMBED)], progress=False).images
    assert not np.array_equal(other, result.images)  # the embedding conditions the image
    unguided = sample(toy, GenerationRequest(steps=5, cfg=1.0, seed=4, n=2), [ImageEmbedding(embedding=embedding)],
                      progress=False).images
    assert not np.array_equal(unguided, result.images)  # and the guidance scale weighs it


def test_a_model_without_text_encoder_refuses_a_prompt(toy):
    with pytest.raises(InputError, match="no text encoder"):
        sample(toy, GenerationRequest(prompt="a red circle", steps=2), [ImageEmbedding()], progress=False)


def test_a_unet_bundle_without_text_encoder_saves_loads_and_samples(tmp_path):
    """Paint-by-Example's shape: a UNet conditioned only on what a control gives, no tokenizer or text encoder."""
    import dataclasses

    from mmsynth.models.zoo import tiny_bundle

    bundle = dataclasses.replace(tiny_bundle(0), tokenizer=None, text_encoder=None, clip=None)
    dim = bundle.unet.config.cross_attention_dim
    bundle.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "text_encoder").exists()
    loaded = Bundle.from_pretrained(tmp_path / "m")
    assert loaded.text_encoder is None and loaded.tokenizer is None

    @dataclass(kw_only=True)
    class Token(Control):
        name: ClassVar[str] = "toy-token"

        def inputs(self, ctx: Any, step: Any, branch: Any, latents: torch.Tensor) -> ModelInputs:
            e = torch.ones(latents.shape[0], 1, dim) * (1.0 if branch.name == "cond" else 0.0)
            return ModelInputs(context=e)

    request = GenerationRequest(steps=3, cfg=2.0, seed=1)
    images = sample(loaded, request, [Token()], progress=False).images
    assert images.shape == (1, bundle.resolution, bundle.resolution, 3)
    assert np.array_equal(images, sample(bundle, request, [Token()], progress=False).images)
    with pytest.raises(InputError, match=r"no control .* gives a context"):
        sample(loaded, request, progress=False)
    (tmp_path / "m" / "text_encoder").mkdir()  # half a text side is a broken model, not a text-free one
    with pytest.raises(InputError, match="no tokenizer/ component"):
        Bundle.from_pretrained(tmp_path / "m")
