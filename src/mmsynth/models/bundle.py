"""A text-to-image model bundle: the five Stable Diffusion components, an optional full CLIP, and named components.

A bundle is stored in diffusers' `StableDiffusionPipeline` directory layout (model_index.json,
tokenizer/, text_encoder/, vae/, unet/, scheduler/, safetensors weights), so what mmsynth trains loads
with the ecosystem's own `StableDiffusionPipeline.from_pretrained(dir)`, and real SD weights load
into mmsynth unchanged. Beside the base, folders that model_index.json does not list (so diffusers ignores
them): the optional full CLIPModel (clip/), which serves exemplar conditions, CLIP score and a feature
extractor; and the named components a method adds (an inpainting UNet, ControlNets, adapters, image encoders),
each in its own folder and listed in mmsynth_components.json (`models.components`), held in `Bundle.extras`
and loaded on first use. A bundle shipped before the manifest existed has unet_inpainting/ and no manifest:
that folder is still read as the inpainting UNet.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmsynth.errors import InputError
from mmsynth.io import atomic_dir
from mmsynth.models.components import (
    MANIFEST,
    Components,
    Entry,
    entry_for,
    first_line,
    load_named,
    move_module,
    read_manifest,
    save_layers,
    save_named,
    write_manifest,
)
from mmsynth.models.sources import looks_like_hub_id

# Component folder -> (how to obtain it when it is missing)
COMPONENTS: dict[str, str] = {
    "tokenizer": "train it with `mmsynth train clip` (the tokenizer is saved with the CLIP text encoder)",
    "text_encoder": "train it with `mmsynth train clip`",
    "vae": "train it with `mmsynth train vae`",
    "unet": "train it with `mmsynth train t2i`",
    "scheduler": "export a bundle with `mmsynth train t2i` (it writes the scheduler config)",
}
# SDXL's second tokenizer and text encoder (its refiner has only these two, the first pair listed as null)
XL_PARTS: dict[str, str] = {"tokenizer_2": "tokenizer", "text_encoder_2": "text encoder"}
CLIP_FOLDER = "clip"
# optional together: a model conditioned only through controls (an exemplar's image embedding, Paint-by-Example)
# is saved without them, and its model_index.json lists them as null
TEXT_PARTS = ("tokenizer", "text_encoder")
# Names a named component may not take: the base's folders, and the other folders diffusers'
# StableDiffusionPipeline knows (a folder of that name would mean something else to it).
RESERVED: frozenset[str] = frozenset({*COMPONENTS, *XL_PARTS, CLIP_FOLDER, "safety_checker", "feature_extractor",
                                      "image_encoder"})
# A named component: a second UNet taking the latents plus a mask and the masked image's latents (Stable
# Diffusion inpainting's 9-channel input), made by `mmsynth train inpaint` (StableDiffusionInpaintPipeline takes
# it as `unet=`). Bundles shipped before the manifest hold it unlisted: LEGACY says what such a folder is.
INPAINTING_UNET = "unet_inpainting"
LEGACY: dict[str, Entry] = {INPAINTING_UNET: {"library": "diffusers", "class": "UNet2DConditionModel"}}
# how to obtain a named component a bundle lacks, where mmsynth can make it
_HOW_NAMED = {INPAINTING_UNET: "train it with `mmsynth train inpaint`"}
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
    # how the CLIP wants its pixels (transformers CLIPImageProcessor: mean, std, size); None with a CLIP: the zoo's
    # convention, images in [-1, 1] (what mmsynth's CLIPs are trained on)
    clip_processor: Any | None = None
    # named components by name (e.g. INPAINTING_UNET); a plain dict given here becomes a Components mapping
    extras: Components = field(default_factory=Components)
    # SDXL's second text encoder (transformers CLIPTextModelWithProjection: hidden states and the pooled embedding
    # the UNet's added time embedding reads) and its tokenizer; None for SD 1.x/2.x
    tokenizer_2: Any | None = None
    text_encoder_2: Any | None = None
    # SDXL pipeline flags from model_index.json: an empty negative prompt is zeros rather than encoded text; the
    # refiner's time ids carry an aesthetic score
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.extras, Components):
            self.extras = Components(self.extras)
        if self.clip is not None and self.clip_processor is None:
            self.clip_processor = zoo_clip_processor(self.clip)

    # ------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD, 4 for the Shapes zoo), computed like diffusers' pipelines."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def is_xl(self) -> bool:
        """An SDXL model: its UNet's added embedding reads pooled text and time ids (two text encoders, or the
        refiner's one)."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

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
        """The neural components by name (those present; named components only once loaded)."""
        named = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2, "vae": self.vae,
                 "unet": self.unet, "clip": self.clip}
        named.update({k: v for k, v in self.extras.loaded().items() if isinstance(v, torch.nn.Module)})
        return {k: v for k, v in named.items() if v is not None}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Bundle:
        """Move every module (in place), and named components when they load; returns self for chaining."""
        for m in self.modules().values():
            move_module(m, device, dtype)
        self.extras.place(device, dtype)
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
        dest = _replaceable(path)
        with atomic_dir(dest, whole=True) as tmp:
            modules = self._copies_in(dtype) if dtype is not None else self
            modules.pipeline().save_pretrained(tmp, safe_serialization=True)
            _portable_tokenizer_class(tmp)
            _float32_by_default(tmp)
            if modules.clip is not None:
                save_clip(modules.clip, tmp / CLIP_FOLDER, self.clip_processor)
            save_named(tmp, modules.extras, RESERVED)  # (each one loaded, if it was not yet)
        return dest

    def pipeline(self) -> Any:
        """The diffusers pipeline of the base components (no copies): StableDiffusionPipeline, or for SDXL
        StableDiffusionXLPipeline (the refiner's StableDiffusionXLImg2ImgPipeline) — what saving writes and what
        parity tests compare with."""
        import diffusers

        if not self.is_xl:
            return diffusers.StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        common = {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                  "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "unet": self.unet,
                  "scheduler": self.scheduler, "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                  "add_watermarker": False}
        if self.requires_aesthetics_score:
            return diffusers.StableDiffusionXLImg2ImgPipeline(**common, requires_aesthetics_score=True)
        return diffusers.StableDiffusionXLPipeline(**common)

    def _copies_in(self, dtype: torch.dtype) -> Bundle:
        def conv(m: Any) -> Any:
            return None if m is None else _cast_copy(m, dtype)

        return Bundle(
            tokenizer=self.tokenizer,
            text_encoder=conv(self.text_encoder),
            vae=conv(self.vae),
            unet=conv(self.unet),
            scheduler=self.scheduler,
            clip=conv(self.clip),
            clip_processor=self.clip_processor,
            extras={k: conv(v) if isinstance(v, torch.nn.Module) else v for k, v in self.extras.items()},  # loads all
            tokenizer_2=self.tokenizer_2,
            text_encoder_2=conv(self.text_encoder_2),
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            requires_aesthetics_score=self.requires_aesthetics_score,
        )

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        load_clip: bool = True,
        components: Collection[str] = (),
        config: str | os.PathLike | None = None,
    ) -> Bundle:
        """Load a bundle saved by mmsynth, any Stable Diffusion 1.x/2.x/SDXL diffusers directory or hub id, or a
        single checkpoint file (through diffusers' from_single_file; `config`: a local diffusers folder of its
        architecture, for use without a network).

        Weights are float32 unless `torch_dtype` says otherwise (whatever dtype they were stored in).
        Named components are checked now and each loaded when first read from `bundle.extras`, so that a run
        loads only the networks it uses; those named in `components` are loaded now (a broken one fails before a
        long run). Raises InputError naming a missing directory, a missing component (and how to obtain it) or
        unreadable weights.
        """
        from mmsynth.models.sources import resolve_source

        found = resolve_source(path_or_hub_id, config)
        if found.kind == "file":
            from mmsynth.models.single_file import bundle_from_single_file

            return bundle_from_single_file(found, torch_dtype)
        source = found.location
        local = Path(source)
        index = model_index(source)
        absent = {name for name in (*COMPONENTS, *XL_PARTS)
                  if _listed_as_none(index, name) and not (local / name).is_dir()}
        if found.kind == "folder" and _without_text(local):
            absent |= set(TEXT_PARTS)
        for pair in (TEXT_PARTS, tuple(XL_PARTS)):  # a tokenizer and its text encoder come and go together
            if len(absent & set(pair)) == 1:
                absent -= set(pair)
        xl = _is_xl_index(index) or (found.kind == "folder" and (local / "text_encoder_2").is_dir())
        wanted = [*COMPONENTS, *(XL_PARTS if xl else ())]
        if found.kind == "folder":
            for name in wanted:
                if name not in absent and not (local / name).is_dir():
                    how = COMPONENTS.get(name, "it is part of an SDXL model: copy the whole model folder")
                    raise InputError(f"model directory '{local}' has no {name}/ component: {how}, {_HOW}")
        named = named_components(source)
        components = (components,) if isinstance(components, str) else tuple(components)
        if missing := [name for name in components if name not in named]:
            raise InputError(f"model '{source}' has no component {', '.join(map(repr, missing))}; its components: "
                             f"{', '.join(named) or 'none'}")
        parts = {name: None if name in absent else load_component(source, name, torch_dtype) for name in wanted}
        clip = None
        if load_clip and found.kind == "folder" and (local / CLIP_FOLDER).is_dir():
            clip = load_component(source, CLIP_FOLDER, torch_dtype)
        processor = None
        if clip is not None and (local / CLIP_FOLDER / "preprocessor_config.json").is_file():
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(local / CLIP_FOLDER)
        bundle = cls(**parts, clip=clip, clip_processor=processor,
                     force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
                     requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
        for name, entry in named.items():
            bundle.extras.add_lazy(name, functools.partial(load_named, source, name, entry, torch_dtype))
        for name in components:
            bundle.extras[name]  # (reading it loads it)
        return bundle.eval()


def model_index(source: str | os.PathLike) -> dict[str, Any]:
    """The pipeline's model_index.json of a folder or a (cached or reachable) hub id; {} when it has none."""
    local = Path(source)
    if local.is_dir():
        try:
            data = json.loads((local / "model_index.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(str(source)))
    except Exception as exc:
        raise InputError(f"model '{source}': cannot read its model_index.json ({first_line(exc)})") from None


def _is_xl_index(index: Mapping[str, Any]) -> bool:
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def _listed_as_none(index: Mapping[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is None


def named_components(source: str | os.PathLike) -> dict[str, Entry]:
    """The named components of the bundle directory `source` ({} for a hub id): those its manifest lists, and
    an unlisted unet_inpainting/ (a bundle shipped before the manifest). InputError on a bad manifest."""
    local = Path(source)
    if not local.is_dir():
        return {}
    legacy = {name: entry for name, entry in LEGACY.items() if (local / name).is_dir()}
    return {**legacy, **read_manifest(local, RESERVED)}


def list_components(root: str | os.PathLike, entries: Mapping[str, Entry]) -> None:
    """Add `entries` to the manifest of the bundle directory `root`, for component folders copied in as they are
    (shipping a trained component into a bundle); an unlisted unet_inpainting/ gets listed too."""
    write_manifest(root, {**named_components(root), **entries}, RESERVED)


def add_components(root: str | os.PathLike, dtype: torch.dtype | None = None,
                   layered: Mapping[str, tuple[torch.nn.Module, torch.nn.Module, str]] | None = None,
                   whole: Mapping[str, torch.nn.Module] | None = None) -> None:
    """Add trained components to the saved bundle at `root`, listed beside what its manifest lists: `layered` as
    name -> (network, its base network, the base's folder), saved as the layers (and LoRA) it adds
    (`components.save_layers`); `whole` with their library's save_pretrained. `dtype` converts the saved weights."""
    entries: dict[str, Entry] = {}
    for name, (module, base, base_name) in (layered or {}).items():
        entries[name] = save_layers(module, base, Path(root) / name, base_name, dtype=dtype)
    for name, module in (whole or {}).items():
        entries[name] = entry_for(module, name)
        (_cast_copy(module, dtype) if dtype is not None else module).save_pretrained(Path(root) / name,
                                                                                       safe_serialization=True)
    list_components(root, entries)


def load_component(source: str | os.PathLike, name: str, torch_dtype: torch.dtype | None = None) -> Any:
    """Load one component of a bundle directory by its folder name: tokenizer, text_encoder, vae, unet, scheduler,
    clip, or a named component (listed in the manifest, or a legacy unet_inpainting/).

    Training recipes use it to pick parts out of partial bundles (e.g. a CLIP run's text encoder).
    Raises InputError naming the component and how to obtain it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    source = str(source)
    local = Path(source)
    if not local.exists() and not looks_like_hub_id(source):
        raise InputError(f"model directory '{source}' does not exist ({_HOW})")
    if name not in COMPONENTS and name not in XL_PARTS and name != CLIP_FOLDER:
        named = named_components(source)
        if name in named:
            return load_named(source, name, named[name], torch_dtype)
        how = f": {_HOW_NAMED[name]}, {_HOW}" if name in _HOW_NAMED else ""
        raise InputError(f"model '{source}' has no component '{name}'{how}; valid: {', '.join(COMPONENTS)}, "
                         f"{', '.join(XL_PARTS)}, {CLIP_FOLDER}, or one it lists in {MANIFEST} "
                         f"({', '.join(named) or 'none'})")
    how = COMPONENTS.get(name) or ("it is part of an SDXL model: copy the whole model folder" if name in XL_PARTS
                                   else "train it with `mmsynth train clip`")
    if local.exists() and not (local / name).is_dir():
        raise InputError(f"model directory '{local}' has no {name}/ component: {how}, {_HOW}")
    # float32 unless asked otherwise (diffusers loads straight into it; transformers 5 keeps the stored dtype,
    # "auto", so it is cast below): a bundle saved in float16 to halve its size must still run on a CPU
    target = torch_dtype or torch.float32
    loaders = {
        "tokenizer": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
        "tokenizer_2": lambda: AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
        "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=target),
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=target),
        "scheduler": lambda: _load_scheduler(source),
        CLIP_FOLDER: lambda: CLIPModel.from_pretrained(source, subfolder=CLIP_FOLDER),
    }
    try:
        component = loaders[name]()
    except InputError:
        raise
    except Exception as exc:  # corrupt or incompatible files: one clear line, not a traceback
        raise InputError(
            f"model '{source}': cannot load its {name} ({first_line(exc)}); "
            f"the files may be corrupt or incomplete: {how}, {_HOW}"
        ) from None
    if isinstance(component, torch.nn.Module) and next(component.parameters()).dtype != target:
        component.to(dtype=target)
    return component


def _replaceable(path: str | os.PathLike) -> Path:
    """`path` as a Path, if saving a model there replaces nothing but a model: it must be absent, empty, or hold a
    model folder (model_index.json, a component manifest or a component folder), so that a mistyped path never
    wipes a user's folder."""
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"cannot save a model to '{dest}': it is a file")
    if dest.is_dir() and any(dest.iterdir()):
        known = {"model_index.json", MANIFEST, CLIP_FOLDER, *LEGACY, *COMPONENTS}
        if not any((dest / name).exists() for name in known):
            raise InputError(f"cannot save a model to '{dest}': it is a non-empty folder that holds no model "
                             "(model_index.json or a component folder); choose a new folder")
    return dest


def save_components(path: str | os.PathLike, dtype: torch.dtype | None = None, **components: Any) -> Path:
    """Save some components (e.g. tokenizer + text_encoder + clip after CLIP training) as a partial bundle.

    Same folder names and formats as a full bundle, written atomically: base folders and clip by name, any
    other name as a named component (listed in the manifest); `Bundle.from_pretrained` on a partial bundle
    names what is missing, and `load_component` reads the parts it has.
    """
    dest = _replaceable(path)
    if dtype is not None:
        components = {k: _cast_copy(v, dtype) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    base = {*COMPONENTS, *XL_PARTS, CLIP_FOLDER}
    with atomic_dir(dest, whole=True) as tmp:
        save_named(tmp, {k: v for k, v in components.items() if k not in base}, RESERVED)
        for name, component in components.items():
            if component is None or name not in base:
                continue
            if name == CLIP_FOLDER:
                save_clip(component, tmp / name)
            elif isinstance(component, torch.nn.Module):
                component.save_pretrained(tmp / name, safe_serialization=True)
            else:  # tokenizer, scheduler
                component.save_pretrained(tmp / name)
        _portable_tokenizer_class(tmp)
        _float32_by_default(tmp)
    return dest


def zoo_clip_processor(clip: Any) -> Any:
    """The image processor of the CLIPs mmsynth trains: they see images in [-1, 1] (the same tensors the VAE and UNet
    get), i.e. mean 0.5 and std 0.5 on [0, 1] pixels, at their own resolution."""
    from transformers import CLIPImageProcessor

    size = int(clip.config.vision_config.image_size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # fmt: skip


def save_clip(clip: Any, folder: Path, processor: Any | None = None) -> None:
    """Save a CLIPModel with the image processor that states its pixel convention (`processor`, or the zoo's):
    `CLIPImageProcessor.from_pretrained` then prepares images for it like for any CLIP, and guidance reads it."""
    clip.save_pretrained(folder, safe_serialization=True)
    (processor or zoo_clip_processor(clip)).save_pretrained(folder)


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy with floating-point parameters/buffers in `dtype` (for saving; the original is untouched).

    Casts tensors directly rather than calling `.to(dtype)`, which diffusers answers with a warning
    meant for inference-time casts.
    """
    import copy

    clone = copy.deepcopy(module)
    for tensor in [*clone.parameters(), *clone.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return clone


def _without_text(local: Path) -> bool:
    """A model saved without tokenizer and text encoder: neither folder, and model_index.json does not name them."""
    if any((local / name).is_dir() for name in TEXT_PARTS):
        return False
    index = local / "model_index.json"
    try:
        listed = json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return False
    return all(not isinstance(listed.get(name), list) or listed[name][0] is None for name in TEXT_PARTS)


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


def _float32_by_default(root: Path) -> None:
    """Record float32 as the dtype of the saved transformers models, whatever dtype their weights are stored in.

    transformers 5 loads in the config's dtype ("auto"), diffusers in float32: a bundle stored in float16 would
    otherwise come out of a plain `StableDiffusionPipeline.from_pretrained(dir)` with a float16 text encoder
    feeding a float32 UNet (a dtype error). An explicit `torch_dtype` still wins in both libraries.
    """
    for config in [root / "text_encoder" / "config.json", root / "text_encoder_2" / "config.json",
                   root / CLIP_FOLDER / "config.json"]:
        if config.is_file():
            data = json.loads(config.read_text())
            if data.get("dtype") not in (None, "float32"):
                data["dtype"] = "float32"
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer_class(root: Path) -> None:
    """Record a generic fast tokenizer as `PreTrainedTokenizerFast`, the name every transformers version knows.

    transformers 5 calls it `TokenizersBackend`, a name transformers 4 (and tools pinned to it) cannot load.
    """
    for name in ("tokenizer", "tokenizer_2"):
        for file, key in ((root / "model_index.json", name), (root / name / "tokenizer_config.json", None)):
            if not file.is_file():
                continue
            data = json.loads(file.read_text())
            if key is not None and data.get(key) == ["transformers", "TokenizersBackend"]:
                data[key] = ["transformers", "PreTrainedTokenizerFast"]
            elif key is None and data.get("tokenizer_class") == "TokenizersBackend":
                data["tokenizer_class"] = "PreTrainedTokenizerFast"
            file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
