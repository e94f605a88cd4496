"""Write a bundle's SD 1.x components as one checkpoint in the original (LDM) key layout, the single-file form
A1111 and ComfyUI save: the input the single-file loader is tested on (no such file can be downloaded here).

Key names of the original layout: UNet `model.diffusion_model.{input_blocks,middle_block,output_blocks,...}`,
VAE `first_stage_model.{encoder,decoder}.{down,mid,up}...`, text encoder `cond_stage_model.transformer.` + the
transformers names. Checked against diffusers' own converters in the test that uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    return key


def unet_keys(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[parts[1]] }." + ".".join(parts[2:])
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + ".".join(parts[1:])
        elif parts[0] == "conv_norm_out":
            new = "out.0." + ".".join(parts[1:])
        elif parts[0] == "conv_out":
            new = "out.2." + ".".join(parts[1:])
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + i * (layers + 1) + layers}.0.op." + ".".join(parts[5:])
            else:
                block = 1 + i * (layers + 1) + j
                new = (f"input_blocks.{block}.0." + _rename(rest, _RESNET) if kind == "resnets"
                       else f"input_blocks.{block}.1.{rest}")
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}." + _rename(rest, _RESNET) if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = i * (layers + 1) + j
            if kind == "upsamplers":
                has_attention = hasattr(unet.up_blocks[i], "attentions")
                slot = 2 if has_attention else 1
                new = f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv." + ".".join(parts[5:])
            else:
                new = (f"output_blocks.{block}.0." + _rename(rest, _RESNET) if kind == "resnets"
                       else f"output_blocks.{block}.1.{rest}")
        else:
            raise KeyError(f"no original name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_keys(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side, rest = parts[0], parts[1:]
        if side in ("quant_conv", "post_quant_conv"):
            out["first_stage_model." + key] = value
            continue
        head = rest[0]
        if head in ("down_blocks", "up_blocks"):
            i, kind = int(rest[1]), rest[2]
            level = i if head == "down_blocks" else levels - 1 - i
            where = "down" if head == "down_blocks" else "up"
            if kind == "resnets":
                tail = _rename(".".join(rest[4:]), {"conv_shortcut": "nin_shortcut"})
                new = f"{where}.{level}.block.{rest[3]}.{tail}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{where}.{level}.{'downsample' if where == 'down' else 'upsample'}." + ".".join(rest[4:])
        elif head == "mid_block":
            kind, j, tail = rest[1], int(rest[2]), ".".join(rest[3:])
            if kind == "resnets":
                new = f"mid.block_{j + 1}." + _rename(tail, {"conv_shortcut": "nin_shortcut"})
            else:
                new = "mid.attn_1." + _rename(tail, _VAE_ATTENTION)
                if tail.endswith("weight") and value.ndim == 2:
                    value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        elif head == "conv_norm_out":
            new = "norm_out." + ".".join(rest[1:])
        else:
            new = ".".join(rest)
        out[f"first_stage_model.{side}.{new}"] = value
    return out


def save_sd1_single_file(bundle, path: Path) -> Path:
    """UNet, VAE and text encoder of an SD 1.x-layout bundle in one safetensors file, original key layout."""
    tensors = {**unet_keys(bundle.unet), **vae_keys(bundle.vae)}
    for key, value in bundle.text_encoder.state_dict().items():  # transformers 5 names drop the text_model. prefix
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
