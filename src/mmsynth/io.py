"""File I/O shared by every layer: tolerant image loading, output checks made before any work starts, and atomic
writes (no half-written files, nothing replaced that the caller did not ask for).

Files and folders written here get the permissions any file the user creates gets (the umask applies), not the
private 0600/0700 of Python's tempfile helpers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmsynth.errors import InputError

OVERWRITE_HINT = "pass --overwrite to replace it"


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL image (RGBA, grayscale, 16-bit, palette) to an HxWx3 uint8 array.

    Alpha is composited over white, 16-bit data is scaled down rather than clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        arr = arr / max(float(arr.max()), 1.0) * 255.0 if arr.max() > 1.0 else arr * 255.0
        return np.repeat(np.clip(arr + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB, with a clear error naming the file when it cannot."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} '{p}' does not exist")
    if p.is_dir():
        raise InputError(f"{what} '{p}' is a directory, expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(p) as img:
            img.load()
            return to_rgb_uint8(img)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} '{p}' is too large to open safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{what} '{p}' is not a readable image ({exc.__class__.__name__})") from None


# ------------------------------------------------------------------------------------------ JSON input


def parse_json(text: str, where: str) -> Any:
    """JSON a user gave (a file's text, an option's value); InputError naming `where` for bad syntax or nesting too
    deep for the parser."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where} is not valid input: its JSON is nested too deeply") from None


def read_text_file(path: str | os.PathLike, what: str, kind: str = "") -> str:
    """The UTF-8 text of file `path` (`what` names it in errors: missing, a folder, not UTF-8; `kind`, e.g. "JSON",
    says what must be UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} '{p}' does not exist or is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} '{p}' is not UTF-8 text{f' ({kind} must be)' if kind else ''}") from None


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """The JSON in file `path` (`what` names it in errors: missing, a folder, not UTF-8, not valid JSON)."""
    return parse_json(read_text_file(path, what, "JSON"), f"{what} '{Path(path)}'")


# ------------------------------------------------------------------------------------------ output checks


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (the folder new folders would be made in)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: Path, what: str, target: Path) -> None:
    """Refuse `target` when `folder` (to be created if absent) cannot hold new files, trying it for real.

    A real probe rather than os.access: it also sees read-only mounts and works for root.
    """
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise InputError(f"{what} '{target}': '{base}' is a file, not a folder")
    probe = base / f".mmsynth-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or exc.__class__.__name__
        raise InputError(f"{what} '{target}': cannot write in '{base}' ({why})") from None


def check_output_file(
    path: str | os.PathLike, what: str = "--out", *, suffixes: tuple[str, ...] = (), overwrite: bool = False
) -> Path:
    """Check an output file before any work: a file path (not a folder), an allowed suffix, a folder that can be
    written, and no existing file unless `overwrite`. Returns it as a Path."""
    if not str(path).strip():
        raise InputError(f"{what} is empty; give a file path")
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        example = p / f"out{suffixes[0] if suffixes else ''}"
        raise InputError(f"{what} '{path}' is a folder; expected a file path (e.g. '{example}')")
    if suffixes and p.suffix.lower() not in suffixes:
        raise InputError(f"{what} '{p}' must end with {' or '.join(suffixes)}")
    if p.exists() and not p.is_file():
        raise InputError(f"{what} '{p}' exists and is not a regular file")
    if p.exists() and not overwrite:
        raise InputError(f"{what} '{p}' already exists ({OVERWRITE_HINT})")
    check_writable(p.parent, what, p)
    return p


def _non_empty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def check_output_dir(path: str | os.PathLike, what: str = "--out", *, overwrite: bool = False) -> Path:
    """Check an output folder before any work: absent, empty, or (with `overwrite`) a folder whose entries of the
    same names the command may replace; never a file. Returns it as a Path."""
    if not str(path).strip():
        raise InputError(f"{what} is empty; give a folder path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} '{p}' is a file; expected a folder")
    if _non_empty_dir(p) and not overwrite:
        raise InputError(
            f"{what} '{p}' already exists and is not empty (pass --overwrite to replace what this command writes "
            "in it; nothing else in it is touched)"
        )
    check_writable(p, what, p)
    return p


# ------------------------------------------------------------------------------------------ atomic writes


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, deepest first (to undo on failure)."""
    made = []
    p = folder.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_permissions(root: Path) -> None:
    """Give `root` (a file, or a folder and all it holds) the modes a file the user creates gets: libraries that write
    through their own temp files (safetensors) leave 0600, which a shared model folder must not have."""
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _claim(folder: Path, prefix: str, suffix: str, make: Callable[[Path], Any]) -> Path:
    """A new temp path in `folder`, created by `make` (exclusive: a name taken meanwhile is skipped)."""
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temp file beside `path`; rename it onto `path` only if the block succeeds.

    On failure nothing is left: neither the temp file nor parent folders this call created.
    """
    dest = Path(path)
    made = _make_parents(dest.parent)
    tmp = _claim(dest.parent, f".{dest.name}.", ".tmp" + dest.suffix,
                 lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)))
    ok = False
    try:
        yield tmp
        user_permissions(tmp)
        os.replace(tmp, dest)
        ok = True
    finally:
        if tmp.exists():
            tmp.unlink()
        if not ok:
            _remove_empty(made)


def save_image(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Save a uint8 array (HxW or HxWx3) as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, stable key order as given)."""
    write_text(json.dumps(obj, indent=2) + "\n", path)


def replace_dir(src: Path, dest: Path) -> None:
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


def _replace_entry(src: Path, dest: Path) -> None:
    """Put file or folder `src` at `dest`, whatever `dest` is now."""
    if src.is_dir() and not src.is_symlink():
        if dest.exists() and not dest.is_dir():
            dest.unlink()
        replace_dir(src, dest)
    else:
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(src, dest)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False, whole: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; its contents go to `path` only if the block succeeds.

    An absent `path` is created by one rename. An existing one is never removed: each entry the block wrote
    replaces the entry of the same name (a non-empty `path` only with `overwrite`, checked again at the end in
    case it appeared meanwhile), and everything else in it stays. `whole=True` replaces the folder itself instead
    (a model bundle, whose stale components must not survive). A failure (or Ctrl-C) leaves `path` as it was and
    no temp folder, nor parent folders this call created, behind.
    """
    dest = Path(path)
    made = _make_parents(dest.absolute().parent)
    # beside `path`; inside it when its entries are merged, so that only `path` itself must be writable ('.' too)
    home = dest if dest.is_dir() and not whole else dest.absolute().parent
    tmp = _claim(home, f".{dest.absolute().name}.tmp-", "", lambda p: p.mkdir(mode=0o700))
    ok = False
    try:
        yield tmp
        user_permissions(tmp)
        if not dest.exists() or whole:
            if dest.exists() and not dest.is_dir():
                raise InputError(f"'{dest}' is a file; expected a folder")
            replace_dir(tmp, dest)
        else:
            if not dest.is_dir():
                raise InputError(f"'{dest}' is a file; expected a folder")
            if any(p != tmp for p in dest.iterdir()) and not overwrite:
                raise InputError(f"'{dest}' appeared while this command ran and is not empty ({OVERWRITE_HINT})")
            for entry in sorted(tmp.iterdir()):
                _replace_entry(entry, dest / entry.name)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            _remove_empty(made)


def _utf8_lines(f: Any, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError:
        raise InputError(f"'{path}' is not UTF-8 text (JSON lines must be)") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    """Yield (line number, parsed JSON, where) for each non-blank line; bad JSON names the file and line."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(_utf8_lines(f, path), start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            yield lineno, parse_json(line, where), where
