"""Configurations of the Shapes model zoo: a miniature Stable Diffusion stack sized for a CPU.

Each builder returns a model of the owning library (transformers `CLIPModel`, diffusers
`AutoencoderKL` / `UNet2DConditionModel` / `DDIMScheduler`) from a `ZooSpec`, so the shipped zoo and
the random tiny models used by the tests come from one code path: a test on `tiny_bundle()` exercises
exactly the configuration logic the real zoo uses. The VAE has three blocks, i.e. a downsampling
factor of 4 (64x64x3 images <-> 16x16x4 latents), which diffusers' pipelines read from
`vae.config.block_out_channels` like they do for SD's factor 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, T2IAdapter, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from mmsynth.models.bundle import Bundle
from mmsynth.models.components import move_module
from mmsynth.models.tokenizer import build_shapes_tokenizer, special_token_ids, tokenize_padded


@dataclass(frozen=True)
class ZooSpec:
    """Every size knob of the zoo in one place (widths, depths, resolution)."""

    resolution: int = 64  # image side in pixels
    max_length: int = 48  # text positions (tokenizer max length)
    # CLIP text tower (also the diffusion model's text encoder) and vision tower
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 8
    projection_dim: int = 128
    # VAE: len(vae_channels) blocks -> factor 2 ** (len - 1)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers: int = 1
    vae_groups: int = 16
    latent_channels: int = 4
    # UNet on latents
    unet_channels: tuple[int, ...] = (64, 96, 128)
    unet_layers: int = 1
    unet_groups: int = 16
    unet_head_dim: int = 32
    unet_cross_attention_levels: tuple[bool, ...] = (True, True, True)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor


# The shipped zoo (models/shapes-v1) and the tests' random miniature.
SHAPES_V1 = ZooSpec()
TINY = ZooSpec(
    resolution=32,
    text_width=32,
    text_layers=2,
    text_heads=2,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    patch_size=8,
    projection_dim=32,
    vae_channels=(8, 16, 16),
    vae_groups=4,
    unet_channels=(16, 32, 32),
    unet_groups=4,
    unet_head_dim=8,
    unet_cross_attention_levels=(False, True, True),
)
ZOO_SPECS: dict[str, ZooSpec] = {"shapes-v1": SHAPES_V1, "tiny": TINY}


def text_config(spec: ZooSpec, tokenizer) -> CLIPTextConfig:
    """CLIP text tower config; bos/eos/pad ids come from the tokenizer (see STACK.md trap)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=4 * spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length,
        projection_dim=spec.projection_dim,
        **special_token_ids(tokenizer),
    )


def vision_config(spec: ZooSpec) -> CLIPVisionConfig:
    """ViT on the full image (64x64, patch 8 -> 64 patches)."""
    return CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=4 * spec.vision_width,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.resolution,
        patch_size=spec.patch_size,
        projection_dim=spec.projection_dim,
    )


def build_clip(spec: ZooSpec, tokenizer) -> CLIPModel:
    """A randomly initialised CLIPModel (text + vision towers, contrastive heads)."""
    config = CLIPConfig(
        text_config=text_config(spec, tokenizer).to_dict(),
        vision_config=vision_config(spec).to_dict(),
        projection_dim=spec.projection_dim,
    )
    return CLIPModel(config)


def build_vae(spec: ZooSpec) -> AutoencoderKL:
    """AutoencoderKL with factor 2 ** (blocks - 1); scaling_factor is set by the VAE recipe after training."""
    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=spec.vae_layers,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.resolution,
        scaling_factor=1.0,
        force_upcast=False,
    )


def build_unet(spec: ZooSpec, cross_attention_dim: int) -> UNet2DConditionModel:
    """Latent UNet cross-attending to the text encoder's hidden states at the chosen levels."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.unet_cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.unet_cross_attention_levels))
    return UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers,
        norm_num_groups=spec.unet_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(max(1, c // spec.unet_head_dim) for c in spec.unet_channels),
    )


def build_controlnet(unet: UNet2DConditionModel, vae_scale_factor: int, conditioning_channels: int = 3,
                     widths: tuple[int, ...] = (16, 32, 96, 256)) -> ControlNetModel:
    """A ControlNet for `unet`: a trainable copy of its encoder and middle block with zero-initialised output
    convolutions (`ControlNetModel.from_unet`), whose condition encoder downsamples the condition image by the
    VAE's factor: log2(factor) stride-2 steps, i.e. log2(factor) + 1 widths (SD: 4 for factor 8; the zoo: 3 for
    factor 4), so diffusers' own ControlNet pipelines run it unchanged (STACK.md)."""
    steps = int(math.log2(vae_scale_factor))
    if 2**steps != vae_scale_factor or steps + 1 > len(widths):
        raise ValueError(f"a VAE factor of {vae_scale_factor} needs a power of two of at most {2 ** (len(widths) - 1)}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths[: steps + 1],
                                     conditioning_channels=conditioning_channels)


def build_gligen_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """GLIGEN's network for `unet`: the same UNet with a gated self-attention layer in every transformer block and
    the box/phrase projection (diffusers' `attention_type="gated"`), holding `unet`'s weights; the gates start at 0,
    so it computes exactly what `unet` does until training opens them."""
    gated = UNet2DConditionModel.from_config(unet.config, attention_type="gated")  # (a kwarg: the config's
    # `_use_default_values` would reset a key changed in the dict)
    missing, unexpected = gated.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not (k.startswith("position_net.") or ".fuser." in k) for k in missing):
        raise ValueError(f"the base UNet's weights do not fit its gated copy ({(unexpected or missing)[0]})")
    return move_module(gated, dtype=next(unet.parameters()).dtype)


def build_adapter(unet: UNet2DConditionModel, vae_scale_factor: int, in_channels: int = 3,
                  num_res_blocks: int = 2) -> T2IAdapter:
    """A full T2I-Adapter for `unet`: one feature map per down block, as wide as that block, the first at latent
    resolution (pixel-unshuffle by the VAE's factor, `downscale_factor`), for `down_intrablock_additional_residuals`.
    The UNet's down blocks must all have cross-attention but the last (SD's layout), which is where diffusers adds
    an adapter's features at the block's own resolution."""
    blocks = unet.config.down_block_types
    if any("CrossAttn" not in b for b in blocks[:-1]):
        raise ValueError(f"a T2I-Adapter needs cross-attention in every down block but the last; this UNet has "
                         f"{', '.join(blocks)}")
    return T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels),
                      num_res_blocks=num_res_blocks, downscale_factor=vae_scale_factor, adapter_type="full_adapter")


def build_scheduler() -> DDIMScheduler:
    """SD's training noise schedule (scaled linear betas, 1000 steps) with DDIM for sampling."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def projected(out: torch.Tensor | Any) -> torch.Tensor:
    """The projected embeddings of `CLIPModel.get_text_features` / `get_image_features`: a tensor in transformers
    4, the `pooler_output` of the output they return in transformers 5 (every reader of CLIP features needs both)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def text_features(clip: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Unit-length projected text embeddings (the vectors retrieval compares), one row per text."""
    ids = tokenize_padded(tokenizer, texts, return_tensors="pt").input_ids.to(next(clip.parameters()).device)
    return torch.nn.functional.normalize(projected(clip.get_text_features(input_ids=ids)), dim=-1)


@torch.no_grad()
def image_features(clip: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-length projected image embeddings of [-1, 1] pixels (the zoo CLIP's input), one row per image."""
    return torch.nn.functional.normalize(projected(clip.get_image_features(pixel_values=pixel_values)), dim=-1)


def run_owners(counts: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """For rows grouped in consecutive runs of `counts[i]`, the index i of the run each row belongs to: which
    scene each of several captions per scene describes."""
    return torch.repeat_interleave(torch.tensor(counts, device=device))


def unit_means(vectors: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The unit-length mean of each consecutive run of `counts[i]` rows: one embedding for a scene from its
    several captions' (the caption target of CLIP training, and the text side's ceiling in its evaluation)."""
    owner = run_owners(counts, vectors.device)
    sums = torch.zeros(len(counts), vectors.shape[1], device=vectors.device, dtype=vectors.dtype)
    return torch.nn.functional.normalize(sums.index_add_(0, owner, vectors), dim=-1)


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """A standalone CLIPTextModel carrying the CLIP text tower's weights (SD's text_encoder component)."""
    encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it
    target = getattr(encoder, "text_model", encoder)
    target.load_state_dict(clip.text_model.state_dict())
    return encoder.to(clip.dtype)


def random_bundle(spec: ZooSpec, seed: int = 0) -> Bundle:
    """Randomly initialised bundle of the given size (the starting point of training)."""
    torch.manual_seed(seed)
    tokenizer = build_shapes_tokenizer(spec.max_length)
    clip = build_clip(spec, tokenizer)
    return Bundle(
        tokenizer=tokenizer,
        text_encoder=text_encoder_from_clip(clip),
        vae=build_vae(spec),
        unet=build_unet(spec, cross_attention_dim=spec.text_width),
        scheduler=build_scheduler(),
        clip=clip,
    )


def tiny_bundle(seed: int = 0) -> Bundle:
    """Random tiny models for tests (32x32 images, 8x8x4 latents, a UNet of ~0.1M parameters)."""
    return random_bundle(TINY, seed)


def tiny_xl_bundle(seed: int = 0, refiner: bool = False) -> Bundle:
    """SDXL's architecture scaled down, random weights (the tests' stand-in for SDXL checkpoints): two text encoders
    (the second a CLIPTextModelWithProjection of twice the width), a UNet cross-attending to both side by side with
    the added "text_time" embedding (pooled text + 6 time ids, 5 with the refiner's aesthetic score), linear
    projections in its transformers; the refiner has only the second encoder."""
    import dataclasses

    from transformers import CLIPTextModelWithProjection

    spec = TINY
    torch.manual_seed(seed)
    tokenizer = build_shapes_tokenizer(spec.max_length)
    first = None if refiner else CLIPTextModel(text_config(spec, tokenizer))
    wide = dataclasses.replace(spec, text_width=2 * spec.text_width, projection_dim=2 * spec.text_width)
    second = CLIPTextModelWithProjection(text_config(wide, tokenizer))
    time_dim, time_ids = 8, 5 if refiner else 6
    context_dim = wide.text_width + (0 if refiner else spec.text_width)
    base = build_unet(spec, cross_attention_dim=context_dim)
    unet = UNet2DConditionModel.from_config({  # (without base's private keys: "_use_default_values" would win)
        **{k: v for k, v in base.config.items() if not k.startswith("_")},
        "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": time_dim * time_ids + wide.projection_dim,
        "use_linear_projection": True})  # fmt: skip
    return Bundle(tokenizer=None if refiner else tokenizer, text_encoder=first, vae=build_vae(spec), unet=unet,
                  scheduler=build_scheduler(), tokenizer_2=tokenizer, text_encoder_2=second,
                  force_zeros_for_empty_prompt=not refiner, requires_aesthetics_score=refiner)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
