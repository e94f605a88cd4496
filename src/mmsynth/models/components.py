"""Named bundle components: the networks a method adds beside the base pipeline, and their manifest.

A ControlNet, a T2I-Adapter, a second UNet (inpainting, GLIGEN), an image encoder: each is saved in its own
folder of the bundle with its owning library's `save_pretrained`, and listed in `mmsynth_components.json` at
the bundle root by library and class name, so it loads back by name with that class and nothing else needs to
know it. diffusers' `StableDiffusionPipeline.from_pretrained` reads only model_index.json, so it ignores both.

The manifest:

    {"format": 1, "components": {"controlnet_depth": {"library": "diffusers", "class": "ControlNetModel"}}}

A component that only ADDS layers to one of the bundle's networks (GLIGEN's gated attention over a frozen UNet) is
stored as those layers: its folder holds the whole network's config (`save_config`) and `layers.safetensors` with
only the weights the base lacks or changes, and its entry names the base folder, `"base": "unet"`. It loads as
`cls.from_config(config)` filled with the base's weights, then its own; diffusers' plain `from_pretrained` of the
folder refuses it (no weights file of its own name) instead of running half-initialised. The card shows the lines.

A bundle holds its components in a `Components` mapping that loads each one on first access (a bundle with five
ControlNets loads none of them for a plain text-to-image run), then keeps it, on the bundle's device and dtype.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from mmsynth.errors import InputError

MANIFEST = "mmsynth_components.json"
MANIFEST_VERSION = 1
# library name in the manifest -> the module its classes are found in by name (one line per new library)
# a library -> the module whose top level exports its model classes ("mmsynth": networks of the source texts that
# neither library ships outside a deprecated pipeline, e.g. Paint-by-Example's exemplar encoder)
LIBRARIES: dict[str, str] = {"diffusers": "diffusers", "transformers": "transformers", "mmsynth": "mmsynth.models"}
# lower case only: two names differing in case would be one folder on a case-insensitive file system
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
NAME_RULE = "1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"

Entry = dict[str, str]  # {"library": ..., "class": ...} (+ "base": a folder, for a component of added layers)
LORA_FILE = "lora.safetensors"  # a layers component's LoRA matrices (peft's names), beside LORA_CONFIG
LORA_CONFIG = "lora_config.json"
LAYERS_FILE = "layers.safetensors"  # not diffusers' weights name: its plain from_pretrained must refuse the folder


def move_module(
    module: torch.nn.Module, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """`module.to(device)`, and to `dtype` only when it differs: diffusers warns on every dtype cast, even a no-op."""
    if device is not None:
        module.to(device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def check_name(name: str, reserved: Collection[str], where: str = "a bundle") -> str:
    """`name` if it can be a component folder of a bundle: a safe folder name, not one of the base's folders."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"{where}: component name {name!r} is not valid; use {NAME_RULE}")
    if name in reserved:
        raise InputError(f"{where}: component name '{name}' is taken by the base model; reserved: "
                         f"{', '.join(sorted(reserved))}")
    return name


def entry_for(component: Any, name: str) -> Entry:
    """The manifest entry of `component`: the library whose top level exports its class under its own name.

    Only such classes can be loaded back by name; anything else is refused before a file is written.
    """
    cls = type(component)
    for library, module in LIBRARIES.items():
        if cls.__module__.split(".")[0] != module.split(".")[0]:
            continue
        if getattr(importlib.import_module(module), cls.__name__, None) is cls and hasattr(cls, "from_pretrained"):
            return {"library": library, "class": cls.__name__}
    raise InputError(f"component '{name}' is a {cls.__module__}.{cls.__name__}; a bundle component must be a model "
                     f"class exported by one of {', '.join(LIBRARIES)} (with save_pretrained/from_pretrained)")


def component_class(entry: Any, name: str, where: str) -> type:
    """The class a manifest entry names, resolved by name in its library; InputError naming what is valid."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("library"), str) or not isinstance(
            entry.get("class"), str):  # fmt: skip
        raise InputError(f"{where}: component '{name}' in {MANIFEST} must be "
                         '{"library": ..., "class": ...}, got ' + json.dumps(entry)[:120])
    library, cls_name = entry["library"], entry["class"]
    if library not in LIBRARIES:
        raise InputError(f"{where}: component '{name}' names library '{library}'; valid: {', '.join(LIBRARIES)}")
    cls = getattr(importlib.import_module(LIBRARIES[library]), cls_name, None)
    network = isinstance(cls, type) and (library != "mmsynth" or issubclass(cls, torch.nn.Module))
    if not network or not hasattr(cls, "from_pretrained"):
        raise InputError(f"{where}: component '{name}' names class '{cls_name}', which {library} does not have "
                         f"(this {library} is version {_version(library)}); valid: a model class {library} exports")
    return cls


def read_manifest(root: str | os.PathLike, reserved: Collection[str]) -> dict[str, Entry]:
    """The components listed in the bundle at `root` ({} when it has no manifest), each checked: a valid name,
    a class its library has, an existing folder. InputError otherwise, naming the bundle and the component."""
    root = Path(root)
    file = root / MANIFEST
    if not file.is_file():
        return {}
    where = f"model '{root}'"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: {MANIFEST} is not readable JSON ({exc.__class__.__name__}: {exc}); "
                         f"expected {_EXAMPLE}") from None
    if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
        raise InputError(f"{where}: {MANIFEST} must be an object {_EXAMPLE}")
    version = data.get("format")
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        raise InputError(f"{where}: {MANIFEST} has format {version!r}; this mmsynth reads format 1 to "
                         f"{MANIFEST_VERSION} (a newer mmsynth wrote it?)")
    return _checked(root, data["components"], reserved)


def write_manifest(root: str | os.PathLike, entries: Mapping[str, Entry], reserved: Collection[str]) -> None:
    """Write the manifest of the bundle at `root` listing `entries` (the folders must be there; checked first)."""
    root = Path(root)
    text = json.dumps({"format": MANIFEST_VERSION, "components": _checked(root, entries, reserved)}, indent=2,
                      sort_keys=True)  # fmt: skip
    (root / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _checked(root: Path, entries: Mapping[str, Any], reserved: Collection[str]) -> dict[str, Entry]:
    """`entries` if each has a valid name, a class its library has and its folder under `root`."""
    where = f"model '{root}'"
    for name, entry in entries.items():
        check_name(name, reserved, where)
        component_class(entry, name, where)
        if not (root / name).is_dir():
            raise InputError(f"{where}: component '{name}' is listed in {MANIFEST} but its folder {name}/ is "
                             f"missing; listed: {', '.join(entries)}")
        base = entry.get("base")
        if base is not None and (not isinstance(base, str) or not _NAME.fullmatch(base) or not (root / base).is_dir()):
            raise InputError(f"{where}: component '{name}' adds layers to base {base!r}, which is not a folder of "
                             "this model")
    return {name: {k: e[k] for k in ("library", "class", "base") if k in e} for name, e in entries.items()}


def save_named(root: str | os.PathLike, components: Mapping[str, Any], reserved: Collection[str]) -> None:
    """Save each component in its folder under `root` with its library's `save_pretrained`, and the manifest
    listing them (none when there are none). Every name and class is checked before anything is written."""
    root = Path(root)
    present = {name: c for name, c in components.items() if c is not None}
    entries = {check_name(name, reserved): entry_for(c, name) for name, c in present.items()}
    for name, component in present.items():
        if isinstance(component, torch.nn.Module):
            component.save_pretrained(root / name, safe_serialization=True)
        else:  # a processor or a scheduler: a config, no weights
            component.save_pretrained(root / name)
    if entries:
        write_manifest(root, entries, reserved)


def load_named(root: str | os.PathLike, name: str, entry: Entry, torch_dtype: torch.dtype | None = None) -> Any:
    """Load one listed component with the class its entry names; float32 unless `torch_dtype` says otherwise
    (whatever dtype it was stored in, as for the base). InputError on unreadable files."""
    where = f"model '{root}'"
    cls = component_class(entry, name, where)
    target = torch_dtype or torch.float32
    # diffusers loads straight into the dtype; transformers 5 keeps the stored one ("auto"), cast below
    kwargs = {"torch_dtype": target} if entry["library"] == "diffusers" and issubclass(cls, torch.nn.Module) else {}
    try:
        if entry.get("base"):
            component = _load_layers(Path(root), name, entry["base"], cls)
        else:
            component = cls.from_pretrained(str(root), subfolder=name, **kwargs)
    except InputError:
        raise
    except Exception as exc:  # corrupt or incompatible files: one clear line, not a traceback
        raise InputError(f"{where}: cannot load its component '{name}' ({entry['class']} from {entry['library']}: "
                         f"{first_line(exc)}); the files may be corrupt or incomplete") from None
    if isinstance(component, torch.nn.Module):
        component.eval()
        if next(component.parameters()).dtype != target:
            component.to(dtype=target)
    return component


def save_layers(module: torch.nn.Module, base: torch.nn.Module, folder: str | os.PathLike, base_name: str,
                dtype: torch.dtype | None = None) -> Entry:
    """Save `module` as the layers it adds to `base` (see the module docstring): its config and the weights that
    `base` lacks or holds with other values. A module carrying LoRA adapters (peft, `add_adapter`) is saved as its
    base weights' changes without them plus the low-rank matrices (LORA_FILE, peft's names, and their LoraConfig):
    a fine-tune that would copy a whole UNet ships in a fraction of its size. Returns its manifest entry (with
    "base": `base_name`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    theirs = base.state_dict()
    lora = _lora_parts(module)
    plain = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
    layers = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in plain.items()
              if k not in theirs or theirs[k].shape != v.shape or not torch.equal(theirs[k].to(v), v)}  # fmt: skip
    if not layers and lora is None:
        raise InputError("the network adds no layers to its base and changes none of its weights; nothing to save")
    module.save_config(folder)
    save_file(layers, str(folder / LAYERS_FILE), metadata={"format": "pt"})
    if lora is not None:
        weights, config = lora
        save_file({k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in weights.items()},
                  str(folder / LORA_FILE), metadata={"format": "pt"})  # fmt: skip
        (folder / LORA_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    entry = entry_for(module, folder.name)
    return {**entry, "base": base_name}


def _lora_parts(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(the LoRA matrices under peft's names, their LoraConfig as a dict) of a module with one adapter, or None."""
    configs = getattr(module, "peft_config", None)
    if not configs:
        return None
    if len(configs) != 1:
        raise InputError(f"a network with {len(configs)} LoRA adapters; save layers with one")
    from peft.utils import get_peft_model_state_dict

    (name, config), = configs.items()
    keep = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights")
    values = {k: getattr(config, k) for k in keep}
    values["target_modules"] = sorted(values["target_modules"])
    return get_peft_model_state_dict(module, adapter_name=name), values


def _load_layers(root: Path, name: str, base: str, cls: type) -> torch.nn.Module:
    """`cls` built from the component's config, with the base folder's weights and then the component's own (its
    LoRA, if it has one, fused in)."""
    model = cls.from_config(cls.load_config(str(root / name)))
    theirs = cls.from_pretrained(str(root), subfolder=base, torch_dtype=torch.float32).state_dict()
    where = f"model '{root}': component '{name}' over '{base}'"
    return fuse_lora_file(apply_layers(model, root / name, theirs, where), root / name, where)


def fuse_lora_file(model: torch.nn.Module, folder: str | os.PathLike, where: str) -> torch.nn.Module:
    """`model` with the LoRA that `save_layers` wrote in `folder` merged into its weights (nothing without one):
    peft's adapter added, its matrices loaded, fused, and the adapter layers removed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / LORA_FILE).is_file():
        return model
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    try:
        config = json.loads((folder / LORA_CONFIG).read_text(encoding="utf-8"))
        model.add_adapter(LoraConfig(**config))
        result = set_peft_model_state_dict(model, load_file(str(folder / LORA_FILE)))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected LoRA weights, e.g. {result.unexpected_keys[0]}")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{where}: its LoRA cannot be applied ({first_line(exc)})") from None
    model.fuse_lora()
    model.unload_lora()
    return model


def apply_layers(model: torch.nn.Module, folder: str | os.PathLike, base_state: Mapping[str, torch.Tensor],
                 where: str) -> torch.nn.Module:
    """`model` with `base_state`'s weights where the layers file in `folder` has none, and the file's elsewhere;
    InputError when the two together do not give every weight of `model` or the file has foreign ones."""
    from safetensors.torch import load_file

    layers = load_file(str(Path(folder) / LAYERS_FILE))
    ours = model.state_dict()
    unknown = sorted(set(layers) - set(ours))
    missing = sorted(set(ours) - set(layers) - set(base_state))
    if unknown or missing:
        raise InputError(f"{where}: the layers do not fit ("
                         f"{'unknown weights ' + unknown[0] if unknown else 'weights missing: ' + missing[0]}, "
                         f"{len(unknown) + len(missing)} in all)")
    model.load_state_dict({k: v for k, v in base_state.items() if k in ours and k not in layers}, strict=False)
    model.load_state_dict(layers, strict=False)
    return model


class Components(MutableMapping):
    """A bundle's named components by name; a component listed but not yet needed is loaded on first access.

    `None` means absent (as for a bundle's optional CLIP): it is never stored. Iterating, `in` and `len` load
    nothing; reading a value (`[name]`, `.get`, `.items()`) loads it. `place` records the device and dtype the
    bundle was moved to, for those loaded later.
    """

    def __init__(self, loaded: Mapping[str, Any] | None = None) -> None:
        self._loaded: dict[str, Any] = {k: v for k, v in (loaded or {}).items() if v is not None}
        self._pending: dict[str, Callable[[], Any]] = {}
        self._device: torch.device | str | None = None
        self._dtype: torch.dtype | None = None

    def add_lazy(self, name: str, load: Callable[[], Any]) -> None:
        """List `name`, to be made by `load()` when first read."""
        self._loaded.pop(name, None)
        self._pending[name] = load

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded(self) -> dict[str, Any]:
        """The components already in memory (what `Bundle.modules` moves and switches to eval)."""
        return dict(self._loaded)

    def place(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Where components loaded from now on go (the bundle moves those already loaded)."""
        self._device = device if device is not None else self._device
        self._dtype = dtype if dtype is not None else self._dtype

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded and name in self._pending:
            component = self._pending[name]()
            if isinstance(component, torch.nn.Module):
                move_module(component, self._device, self._dtype)
            self._loaded[name] = component
            del self._pending[name]
        return self._loaded[name]

    def __setitem__(self, name: str, component: Any) -> None:
        self._pending.pop(name, None)
        if component is None:
            self._loaded.pop(name, None)
        else:
            self._loaded[name] = component

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._loaded.pop(name, None)
        self._pending.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._loaded, *self._pending])

    def __len__(self) -> int:
        return len(self._loaded) + len(self._pending)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._pending

    def __repr__(self) -> str:
        return f"Components(loaded={sorted(self._loaded)}, not loaded={sorted(self._pending)})"


def first_line(exc: BaseException) -> str:
    """An exception's class and the first line of its message, short enough for a one-line error."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:200]}" if text else exc.__class__.__name__


def _version(library: str) -> str:
    return str(getattr(importlib.import_module(LIBRARIES[library]), "__version__", "?"))


_EXAMPLE = '{"format": 1, "components": {"NAME": {"library": "diffusers", "class": "ControlNetModel"}}}'
