"""The model options of every command that samples, and the one way they load a bundle.

--model takes a diffusers folder (SD 1.x/2.x/SDXL, or an mmsynth bundle), a single checkpoint file (with --config
for offline use) or a hub id; --dtype and --device say where and how it runs; --lora adds LoRA weights (diffusers'
`load_lora_weights`, fused at their scale); --attention-slicing and --vae-tiling trade speed for memory on large
images. Not a command: no `register`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsynth.errors import InputError

if TYPE_CHECKING:
    import torch

    from mmsynth.models import Bundle

log = logging.getLogger(__name__)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> torch's name (request.DTYPES)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --config, --dtype, --device, --lora, --attention-slicing, --vae-tiling."""
    from mmsynth.models.shipped import DEFAULT_MODEL

    p.add_argument("--model", default=None,
                   help=f"a diffusers model folder (SD 1.x, 2.x, SDXL; default: {DEFAULT_MODEL}, the shipped zoo), "
                   "a single .safetensors/.ckpt checkpoint, or a hub id (owner/name; needs a network or the cache)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="with a single-file --model: a local diffusers folder of the same architecture, whose configs "
                   "describe the file (diffusers otherwise fetches them from the hub)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights' precision (default: fp16 on a GPU, fp32 on the CPU; fp16 on the CPU falls back to "
                   "fp32 with a warning)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="LoRA weights in diffusers or kohya format (a file or a folder), fused at SCALE (default 1); "
                   "repeat for several")
    p.add_argument("--attention-slicing", action="store_true",
                   help="compute attention in slices (less memory on large images, slower)")
    p.add_argument("--vae-tiling", action="store_true", help="decode and encode the VAE in tiles (large images)")


@dataclass(frozen=True)
class Lora:
    """One LoRA to fuse: where it is and at what scale."""

    path: str
    scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Lora:
        path, sep, scale = spec.rpartition(":")
        if not sep or not _is_number(scale):  # no scale given (a path may itself hold a colon)
            path, scale = spec, "1"
        return cls.checked(path, float(scale))

    @classmethod
    def checked(cls, path: str, scale: float) -> Lora:
        if not Path(path).exists():
            raise InputError(f"--lora '{path}' does not exist; give a LoRA .safetensors file or the folder holding "
                             "one, optionally with :SCALE (e.g. style.safetensors:0.8)")
        return cls(path, scale)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """--dtype for `device`: fp16 on a GPU and fp32 elsewhere by default; fp16 asked on the CPU (where its matmuls
    are slow or missing) runs in fp32, with a warning."""
    import torch

    on_gpu = device.startswith("cuda")
    if name is None:
        return torch.float16 if on_gpu else torch.float32
    if name not in DTYPES:
        raise InputError(f"--dtype '{name}' is not one of {', '.join(sorted(DTYPES))}")
    if name == "fp16" and device.startswith("cpu"):
        log.warning("--dtype fp16 on the CPU: running in fp32 (use bf16 for half precision on a CPU)")
        return torch.float32
    return getattr(torch, DTYPES[name])


def load_bundle(args: argparse.Namespace, model: str | None = None, loras: list[Lora] | None = None) -> Bundle:
    """The bundle the options describe (`model` and `loras` override --model and --lora: a replayed request's), on
    its device and in its dtype, LoRAs fused, memory options applied."""
    import torch

    from mmsynth.cli.arguments import resolve_device
    from mmsynth.models import Bundle
    from mmsynth.models.shipped import resolve_model

    device = resolve_device(getattr(args, "device", None))
    dtype = resolve_dtype(getattr(args, "dtype", None), device)
    source = resolve_model(model or getattr(args, "model", None))
    bundle = Bundle.from_pretrained(source, torch_dtype=dtype, config=getattr(args, "config", None))
    bundle.to(device)
    if bundle.is_xl and dtype == torch.float16 and getattr(bundle.vae.config, "force_upcast", False):
        bundle.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16: diffusers' pipeline upcasts it too
    if loras is None:
        loras = [Lora.parse(spec) for spec in getattr(args, "lora", None) or []]
    for lora in loras:
        apply_lora(bundle, lora)
    if getattr(args, "attention_slicing", False):
        bundle.unet.set_attention_slice("auto")
    if getattr(args, "vae_tiling", False):
        bundle.vae.enable_tiling()
    return bundle


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype name of a torch dtype (what a request records)."""
    return {v: k for k, v in DTYPES.items()}[str(dtype).removeprefix("torch.")]


def check_lora_reach(bundle: Bundle, controls: list[Any], loras: list[Any]) -> None:
    """LoRAs are fused into the bundle's UNet only: refuse a run whose controls sample another UNet (inpainting,
    Paint-by-Example, Composer), which the LoRA would silently not reach."""
    if not loras:
        return
    other = [name for c in controls if (name := c.unet_name(bundle)) is not None]
    if other:
        raise InputError(f"--lora changes the model's unet/, but this run samples its '{other[0]}' component; drop "
                         "--lora or the control that needs that UNet")


def apply_lora(bundle: Bundle, lora: Lora) -> None:
    """Fuse one LoRA into the bundle's UNet (and text encoders, where it has layers for them) at its scale, through
    diffusers' pipeline loader; InputError when it does not fit this model (a LoRA for another base)."""
    pipe = bundle.pipeline()
    path = Path(lora.path)
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    where = path.parent if path.is_file() else path
    try:
        pipe.load_lora_weights(str(where), adapter_name="mmsynth_lora", **kwargs)
        pipe.fuse_lora(lora_scale=lora.scale, adapter_names=["mmsynth_lora"])
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go (plain modules, full speed)
    except Exception as exc:
        from mmsynth.models.components import first_line

        lines = [line.strip() for line in str(exc).splitlines()]
        why = next((line for line in lines if line.startswith("size mismatch")), first_line(exc))
        raise InputError(f"--lora '{lora.path}' does not fit this model ({why}); a LoRA works only on the base it was "
                         "trained for (same layer names and widths)") from None
