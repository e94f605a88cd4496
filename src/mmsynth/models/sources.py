"""Where a model comes from: a diffusers folder, a single checkpoint file, or a Hugging Face Hub id.

Users own Stable Diffusion weights in all three forms. Each is told apart here, before any loading, so that a
mistyped local path is never sent to the hub, a hub id without a network fails in a second with one line rather
than after a minute of retries, and a single file goes to diffusers' `from_single_file` (with a local config folder
for offline use). `model_hash` gives the short SHA-256 the A1111 and ComfyUI ecosystems print as "Model hash".
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmsynth.errors import InputError

# the suffixes of the single-file checkpoints diffusers' from_single_file reads
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HASH_CACHE_ENV = "MMSYNTH_HASH_CACHE"  # where computed hashes are kept (default ~/.cache/mmsynth/hashes.json)
HUB_TIMEOUT_S = 5.0  # how long a hub id may take to answer before the error says the hub cannot be reached


@dataclass(frozen=True)
class ModelSource:
    """A model location, classified: "folder" (a diffusers pipeline directory), "file" (a single checkpoint; `config`
    is the folder or hub id whose configs describe it, None to let diffusers infer and fetch them) or "hub"."""

    kind: Literal["folder", "file", "hub"]
    location: str
    config: str | None = None


def resolve_source(model: str | os.PathLike, config: str | os.PathLike | None = None) -> ModelSource:
    """Classify `model`; InputError for a path that does not exist, with the nearest existing names when its folder
    does (a typo), and for a hub id that cannot be fetched (checked quickly: the cache, offline mode, the network)."""
    text = str(model)
    path = Path(text).expanduser()
    if config is not None and not path.is_file():
        raise InputError(f"--config describes a single checkpoint file; '{text}' is not one (a folder or hub id "
                         "carries its own configs)")
    if path.is_dir():
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise InputError(f"model '{text}' is a file but not a checkpoint: expected a diffusers model folder "
                             f"(model_index.json, unet/, ...) or a single {'/'.join(SINGLE_FILE_SUFFIXES)} file")
        cfg = None if config is None else str(config)
        if cfg is not None and not Path(cfg).is_dir() and not looks_like_hub_id(cfg):
            raise InputError(f"--config '{cfg}' is not a folder: give the diffusers folder (model_index.json and "
                             "each component's config) of the checkpoint's architecture")
        return ModelSource("file", str(path), cfg)
    if looks_like_hub_id(text):
        typo_possible = _parent_exists(path)
        cached = _cached_on_hub(text) if typo_possible else None  # (asked once: check_hub_id reuses it)
        if not typo_possible or cached:
            check_hub_id(text, cached)
            return ModelSource("hub", text)
    raise InputError(f"model '{text}' does not exist{_did_you_mean(path)}; give a diffusers model folder, a single "
                     "checkpoint file (.safetensors, .ckpt) or a hub id (owner/name)")


def looks_like_hub_id(text: str) -> bool:
    """owner/name, as the hub spells repository ids (a path with more parts, or starting with . or ~, is local)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _parent_exists(path: Path) -> bool:
    """`models/shapes-v2` with a local `models/` folder is a mistyped path, not the hub user `models`."""
    return path.parent != Path(".") and path.parent.is_dir()


def _cached_on_hub(repo_id: str) -> bool:
    """`repo_id` is in the local hub cache (then it is a hub id even where a local folder is named like its owner)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return False
    return True


def _did_you_mean(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() or p.suffix.lower() in SINGLE_FILE_SUFFIXES]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(str(parent / c)) for c in close)}?)" if close else ""


def check_hub_id(repo_id: str, cached: bool | None = None) -> None:
    """Succeed when `repo_id` is in the local hub cache (`cached`, when the caller already asked) or the hub answers
    for it; else InputError in one line, saying whether the hub is switched off (HF_HUB_OFFLINE), unreachable or does
    not know the id."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    if cached if cached is not None else _cached_on_hub(repo_id):
        return  # from_pretrained reads it without the network
    local = (f"'{repo_id}' is not a local folder and is not in the hub cache ({constants.HF_HUB_CACHE}); download it "
             "where there is a network (`hf download` or save_pretrained) and pass the folder")
    if constants.HF_HUB_OFFLINE:
        raise InputError(f"hub id {local} (HF_HUB_OFFLINE is set)")
    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise InputError(f"the hub has no model '{repo_id}' (or it is private: log in with `hf auth login`)") from None
    except Exception as exc:  # connection refused, timeout, DNS: no network
        raise InputError(f"cannot reach the Hugging Face Hub for {local} ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------------------ hashes


def model_hash(source: str | os.PathLike) -> str | None:
    """The first 10 hex digits of the model's SHA-256: of the file for a single checkpoint (A1111's "Model hash"),
    of every weight file's digest in path order for a folder; None for a hub id. Cached by path, size and mtime,
    since a multi-GB checkpoint takes seconds to hash."""
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES)
    else:
        return None
    if path.is_file():
        return _file_digest(path)[:10]
    combined = hashlib.sha256()
    for f in files:
        combined.update(f.relative_to(path).as_posix().encode() + b"\0" + _file_digest(f).encode() + b"\n")
    return combined.hexdigest()[:10]


def _file_digest(path: Path) -> str:
    cache_file = Path(os.environ.get(HASH_CACHE_ENV, Path.home() / ".cache" / "mmsynth" / "hashes.json"))
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if not isinstance(cache, dict):
        cache = {}
    cache[key] = value
    try:
        from mmsynth.io import write_text

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(cache), cache_file)
    except OSError:
        pass  # a read-only home: hash again next time
    return value
