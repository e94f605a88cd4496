"""x_T files: the latents an inversion reached, with the request that reproduces them (safetensors + JSON metadata).

`mmsynth invert --out x_T.safetensors` writes one; `generate --latents` and the `latents` control read it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmsynth.errors import InputError
from mmsynth.sample.request import GenerationRequest

LATENTS_FORMAT = "mmsynth.latents/1"


def save_latents(latents: torch.Tensor, path: str | Path, request: GenerationRequest, model: str | None = None) -> None:
    """Write x_T and the request that produced it (JSON, in the safetensors metadata) atomically."""
    from safetensors.torch import save_file

    from mmsynth.io import atomic_path

    meta = {"format": LATENTS_FORMAT, "request": request.to_json(), "model": model or request.model or ""}
    with atomic_path(path) as tmp:
        save_file({"latents": latents.detach().cpu().float().contiguous()}, str(tmp), metadata=meta)


def load_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(x_T, metadata with the inversion request decoded) from a file written by `save_latents`."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(f"latents file '{p}' does not exist (expected an x_T .safetensors from `mmsynth invert`)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "latents" not in set(f.keys()):
                raise InputError(f"latents file '{p}' has no 'latents' tensor (not written by `mmsynth invert`)")
            x = f.get_tensor("latents")
    except InputError:
        raise
    except Exception:
        raise InputError(f"latents file '{p}' is not a readable safetensors file") from None
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        raise InputError(f"latents file '{p}' holds NaN, infinite or non-float values; x_T must be finite floats")
    if "request" in meta:
        from mmsynth.io import parse_json

        meta["request"] = parse_json(meta["request"], f"latents file '{p}': its 'request' metadata")
    if meta.get("format", LATENTS_FORMAT) != LATENTS_FORMAT:
        raise InputError(f"latents file '{p}' has format {meta['format']!r}; expected {LATENTS_FORMAT!r} (an x_T "
                         "written by `mmsynth invert`)")
    return x, meta
