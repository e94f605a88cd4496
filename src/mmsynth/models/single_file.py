"""Single-file checkpoints (.safetensors / .ckpt in the original Stable Diffusion layout) as bundles.

Most weights users own come as one file, as A1111 and ComfyUI save them. diffusers' `from_single_file` converts
them; it needs the configs of the checkpoint's architecture, which it fetches from the hub unless `config` names a
local diffusers folder of that architecture (the way to use it offline). Which pipeline reads the file comes from
that folder's model_index.json, else from the checkpoint's keys (diffusers' own `infer_diffusers_model_type`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmsynth.errors import InputError
from mmsynth.models.components import first_line

if TYPE_CHECKING:
    from mmsynth.models.bundle import Bundle
    from mmsynth.models.sources import ModelSource

# diffusers' name of a checkpoint's architecture -> the pipeline class that reads it
PIPELINES: dict[str, str] = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
}
_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}


def architecture(path: str | Path, config: str | None) -> str:
    """The pipeline class for the checkpoint at `path`: the config folder's, else the one its keys show."""
    if config is not None:
        from mmsynth.models.bundle import model_index

        name = str(model_index(config).get("_class_name", ""))
        if name not in _CLASSES:
            raise InputError(f"--config '{config}' describes a {name or 'pipeline without a _class_name'}; supported: "
                             f"{', '.join(sorted(_CLASSES))} (Stable Diffusion 1.x/2.x and SDXL)")
        return name
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path))
    except Exception as exc:
        raise InputError(f"model '{path}' is not a readable checkpoint ({first_line(exc)})") from None
    kind = infer_diffusers_model_type(checkpoint)
    if kind not in PIPELINES:
        raise InputError(f"model '{path}' is a '{kind}' checkpoint; supported single files: "
                         f"{', '.join(PIPELINES)} (Stable Diffusion 1.x, 2.x, SDXL base and refiner)")
    return PIPELINES[kind]


def bundle_from_single_file(source: ModelSource, torch_dtype: torch.dtype | None = None) -> Bundle:
    """Load a single-file checkpoint through diffusers and hold its components as a Bundle (float32 unless
    `torch_dtype` says otherwise)."""
    import diffusers

    from mmsynth.models.bundle import Bundle

    name = architecture(source.location, source.config)
    pipe_cls = getattr(diffusers, name)
    kwargs: dict[str, Any] = {}  # (float32 by default; a cast to it only adds diffusers' warnings)
    if torch_dtype not in (None, torch.float32):
        kwargs["torch_dtype"] = torch_dtype
    if source.config is not None:
        kwargs["config"] = source.config
    if name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = pipe_cls.from_single_file(source.location, **kwargs)
    except Exception as exc:
        hint = ("" if source.config is not None else
                "; without a network give --config DIR, a local diffusers folder of the same architecture (its "
                "model_index.json and component configs)")
        raise InputError(f"model '{source.location}': diffusers cannot load it as a {name} "
                         f"({first_line(exc)}){hint}") from None
    index = dict(pipe.config)
    parts = {name: getattr(pipe, name, None) for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}
    bundle = Bundle(**parts, vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler,
                    force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                    requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
    return bundle.eval()
