"""Provenance inside every PNG: the request that made it, and the `parameters` line A1111 and ComfyUI users read.

An image copied away from its folder still says how to make it again: `mmsynth generate --replay image.png` reads
the `mmsynth.request` text chunk (the per-image request as JSON), and image browsers built for A1111 show the
`parameters` chunk (prompt, negative prompt, steps, sampler, CFG, seed, size, model hash).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsynth.errors import InputError

if TYPE_CHECKING:
    from PIL.PngImagePlugin import PngInfo

    from mmsynth.sample.request import GenerationRequest

REQUEST_KEY = "mmsynth.request"
PARAMETERS_KEY = "parameters"  # A1111's key
# our scheduler names -> the sampler names A1111 prints
SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp-2m": "DPM++ 2M", "unipc": "UniPC", "euler": "Euler"}


def a1111_parameters(request: GenerationRequest) -> str:
    """The request as A1111 writes its `parameters`: the prompt, a `Negative prompt:` line, then `Key: value` pairs."""
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    negative = request.negative_prompt if isinstance(request.negative_prompt, str) else request.negative_prompt[0]
    pairs = [("Steps", request.steps), ("Sampler", SAMPLER_NAMES.get(request.scheduler, request.scheduler)),
             ("CFG scale", f"{request.cfg:g}"), ("Seed", request.seed)]
    if request.height is not None and request.width is not None:
        pairs.append(("Size", f"{request.width}x{request.height}"))
    if request.model_hash:
        pairs.append(("Model hash", request.model_hash))
    if request.model:
        pairs.append(("Model", Path(request.model).stem if Path(request.model).suffix else Path(request.model).name))
    if request.scheduler == "ddim" and request.eta:
        pairs.append(("Eta", f"{request.eta:g}"))
    if request.loras:
        pairs.append(("Lora", ", ".join(f"{Path(x['path']).stem}:{x['scale']:g}" for x in request.loras)))
    if request.controls:
        pairs.append(("Controls", ", ".join(str(c.get("name")) for c in request.controls)))
    pairs.append(("Version", f"mmsynth {_version()}"))
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quoted(v)}" for k, v in pairs))
    return "\n".join(lines)


def _quoted(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in ',:"\n') else text  # as A1111 quotes such values


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmsynth")
    except PackageNotFoundError:
        return "unknown"


def png_info(request: GenerationRequest) -> PngInfo:
    """The text chunks of one image's PNG: its request (JSON) and A1111's parameters."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(REQUEST_KEY, request.to_json())  # iTXt: UTF-8, any prompt
    info.add_itxt(PARAMETERS_KEY, a1111_parameters(request))
    return info


def read_request(path: str | os.PathLike, what: str = "--replay") -> Any:
    """The request JSON object stored in a PNG written by mmsynth; InputError when the file has none."""
    from PIL import Image, UnidentifiedImageError

    from mmsynth.io import parse_json

    try:
        with Image.open(path) as img:
            img.load()
            text = img.info.get(REQUEST_KEY)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{what} '{path}' is not a readable image ({type(exc).__name__})") from None
    if not isinstance(text, str):
        raise InputError(f"{what} '{path}' carries no mmsynth request (a PNG written by `mmsynth generate` has one in "
                         f"its '{REQUEST_KEY}' text chunk); give that PNG or its requests/NNNN.json")
    return parse_json(text, f"{what} '{path}'")
