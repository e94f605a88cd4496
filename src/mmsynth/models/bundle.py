"""A text-to-image model bundle: the five Stable Diffusion components (plus an optional full CLIP).

A bundle is stored in diffusers' `StableDiffusionPipeline` directory layout (model_index.json,
tokenizer/, text_encoder/, vae/, unet/, scheduler/, safetensors weights), so what mmsynth trains loads
with the ecosystem's own `StableDiffusionPipeline.from_pretrained(dir)`, and real SD weights load
into mmsynth unchanged. The optional full CLIPModel (clip/, not listed in model_index.json, so
diffusers ignores it) serves exemplar conditions, CLIP score and a feature extractor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmsynth.errors import InputError

# Component folder -> (how to obtain it when it is missing)
COMPONENTS: dict[str, str] = {
    "tokenizer": "train it with `mmsynth train clip` (the tokenizer is saved with the CLIP text encoder)",
    "text_encoder": "train it with `mmsynth train clip`",
    "vae": "train it with `mmsynth train vae`",
    "unet": "train it with `mmsynth train t2i`",
    "scheduler": "export a bundle with `mmsynth train t2i` (it writes the scheduler config)",
}
CLIP_FOLDER = "clip"
_HOW = "or point --model at a complete Stable Diffusion directory or hub id"


@dataclass
class Bundle:
    """The models of one text-to-image system; any of them may be swapped by a recipe or a control."""

    tokenizer: Any  # transformers PreTrainedTokenizerFast / CLIPTokenizer
    text_encoder: Any  # transformers CLIPTextModel
    vae: Any  # diffusers AutoencoderKL
    unet: Any  # diffusers UNet2DConditionModel
    scheduler: Any  # a diffusers scheduler
    clip: Any | None = None  # transformers CLIPModel (optional)
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific models added by later issues

    # ------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD, 4 for the Shapes zoo), computed like diffusers' pipelines."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def resolution(self) -> int:
        """Default image side in pixels (UNet sample size times the VAE factor)."""
        return self.latent_size * self.vae_scale_factor

    # ------------------------------------------------------------ device / dtype
    def modules(self) -> dict[str, torch.nn.Module]:
        """The neural components by name (those present)."""
        named = {"text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet, "clip": self.clip}
        named.update({k: v for k, v in self.extras.items() if isinstance(v, torch.nn.Module)})
        return {k: v for k, v in named.items() if v is not None}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Bundle:
        """Move every module (in place); returns self for chaining."""
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> Bundle:
        for m in self.modules().values():
            m.eval()
        return self

    # ------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the bundle in the StableDiffusionPipeline layout, atomically (temp dir, then rename).

        `dtype` (e.g. torch.float16) converts the saved weights only; the in-memory models are untouched.
        """
        from diffusers import StableDiffusionPipeline

        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            modules = self._copies_in(dtype) if dtype is not None else self
            pipe = StableDiffusionPipeline(
                vae=modules.vae,
                text_encoder=modules.text_encoder,
                tokenizer=modules.tokenizer,
                unet=modules.unet,
                scheduler=modules.scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            if modules.clip is not None:
                modules.clip.save_pretrained(tmp / CLIP_FOLDER, safe_serialization=True)
            _replace_dir(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def _copies_in(self, dtype: torch.dtype) -> Bundle:
        import copy

        def conv(m: Any) -> Any:
            return None if m is None else copy.deepcopy(m).to(dtype)

        return Bundle(
            tokenizer=self.tokenizer,
            text_encoder=conv(self.text_encoder),
            vae=conv(self.vae),
            unet=conv(self.unet),
            scheduler=self.scheduler,
            clip=conv(self.clip),
        )

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, load_clip: bool = True
    ) -> Bundle:
        """Load a bundle saved by mmsynth or any Stable Diffusion (v1-style) directory / hub id.

        Raises InputError naming a missing directory, a missing component (and how to obtain it) or
        unreadable weights.
        """
        source = str(path_or_hub_id)
        local = Path(source)
        if local.exists():
            if not local.is_dir():
                raise InputError(f"model '{local}' is a file; expected a model directory (model_index.json, unet/, ...)")
            for name, how in COMPONENTS.items():
                if not (local / name).is_dir():
                    raise InputError(f"model directory '{local}' has no {name}/ component: {how}, {_HOW}")
        elif not _looks_like_hub_id(source):
            raise InputError(f"model directory '{source}' does not exist ({_HOW})")

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

        def load(name: str, fn: Any) -> Any:
            try:
                return fn()
            except InputError:
                raise
            except Exception as exc:  # corrupt or incompatible files: one clear line, not a traceback
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise InputError(
                    f"model '{source}': cannot load its {name} ({exc.__class__.__name__}: {first}); "
                    f"the files may be corrupt or incomplete: {COMPONENTS.get(name, 're-train it')}, {_HOW}"
                ) from None

        tokenizer = load("tokenizer", lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer"))
        text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder"))
        vae = load("vae", lambda: AutoencoderKL.from_pretrained(source, subfolder="vae"))
        unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet"))
        scheduler = load("scheduler", lambda: _load_scheduler(source))
        clip = None
        if load_clip and local.exists() and (local / CLIP_FOLDER).is_dir():
            clip = load(CLIP_FOLDER, lambda: CLIPModel.from_pretrained(local / CLIP_FOLDER))
        bundle = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler, clip=clip)
        if torch_dtype is not None:
            bundle.to(dtype=torch_dtype)
        return bundle.eval()


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _load_scheduler(source: str) -> Any:
    """The scheduler class recorded in the bundle (DDIM when none is recorded)."""
    import diffusers

    name = "DDIMScheduler"
    index = Path(source) / "model_index.json"
    if index.is_file():
        entry = json.loads(index.read_text()).get("scheduler")
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            name = entry[1]
    scheduler_cls = getattr(diffusers, name, None) or diffusers.DDIMScheduler
    return scheduler_cls.from_pretrained(source, subfolder="scheduler")


def _replace_dir(src: Path, dest: Path) -> None:
    """Put directory `src` at `dest`, replacing an existing one with the shortest possible gap."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    old.rmdir()
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
