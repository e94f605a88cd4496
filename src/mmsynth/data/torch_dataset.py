"""PyTorch datasets over Shapes and the exchange format: seeded, endless or sized, worker-safe.

Every item is a pure function of (source, seed, index): DataLoader workers need no shared state, and a
resumed run that restarts at index k sees exactly the items it would have seen. An example is a dict:
`pixel_values` (3xHxW in [-1, 1]), `caption` (one of `captions`, picked by seed and index), `scene` (the
spec as a dict, or None), `index`, and one uint8 tensor per condition map asked for (HxW, or HxWx3 for
colour maps), exactly as `mmsynth data export` writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmsynth.data.annotations import MAP_NAMES, N_CAPTIONS, annotate_scene
from mmsynth.data.captions import captions
from mmsynth.data.export import read_metadata
from mmsynth.data.render import check_resolution, render
from mmsynth.data.scene import Scene, sample_scene
from mmsynth.errors import InputError
from mmsynth.io import load_image

ENDLESS = 2**62  # the length of a dataset indexed forever (the trainer's indices are a function of the step)


def _pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float() / 127.5 - 1.0


def _pick(caps: list[str], seed: int, index: int) -> str:
    """One caption per (seed, index): later epochs pair an image with its other captions."""
    return caps[int(np.random.default_rng([seed, index, 0xCAB]).integers(len(caps)))]


def check_maps(maps: tuple[str, ...], valid: tuple[str, ...], where: str) -> tuple[str, ...]:
    unknown = [m for m in maps if m not in valid]
    if unknown:
        raise InputError(f"{where} has no condition map {', '.join(map(repr, unknown))}; it has: {', '.join(valid)}")
    return tuple(maps)


def example_of_scene(
    scene: Scene, index: int, seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A training example of `scene` (a sampled or an edited one); `index` and `seed` pick its caption."""
    if maps:
        ann = annotate_scene(scene, resolution)
        image, caps = ann.image, ann.records["captions"]
    else:  # no maps asked: skip the annotations, which cost more than the render itself
        image, caps = render(scene, resolution), captions(scene, N_CAPTIONS)
    example: dict[str, Any] = {
        "pixel_values": _pixels(image),
        "caption": _pick(caps, seed, index),
        "captions": caps,
        "scene": scene.to_dict(),
        "index": index,
    }
    for name in maps:
        example[name] = torch.from_numpy(ann.maps[name].copy())
    return example


class ShapesDataset(Dataset):
    """Shapes rendered on the fly: index i is scene i of the split, with the exact condition maps in `maps`
    (`data.annotations.MAP_NAMES`). `length` None: endless, what training reads; else a sized dataset."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        resolution: int = 64,
        maps: tuple[str, ...] = (),
        length: int | None = None,
    ):
        sample_scene(split, 0, seed)  # validates the split now, with a clear message
        self.split, self.seed, self.resolution = split, seed, check_resolution(resolution)
        self.maps = check_maps(maps, MAP_NAMES, "a Shapes scene")
        self.length = length

    def __len__(self) -> int:
        return ENDLESS if self.length is None else self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        scene = sample_scene(self.split, index, self.seed)
        return example_of_scene(scene, index, self.seed, self.resolution, self.maps)


class EpochOrder:
    """Global example index -> row of a finite set: epoch e visits all n rows in a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, index: int) -> int:
        epoch, i = divmod(int(index), self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i])


class ImageFolderDataset(Dataset):
    """An imagefolder export (the exchange format, `data.export`) read endlessly in seeded per-epoch orders;
    condition map m comes from each row's `m_file_name` column."""

    def __init__(self, folder: str | Path, seed: int = 0, resolution: int = 64, maps: tuple[str, ...] = ()):
        self.folder, self.seed, self.resolution = Path(folder), seed, resolution
        self.rows = read_metadata(folder)
        for row in self.rows:
            if not (row.get("caption") or row.get("captions") or row.get("prompt")):
                raise InputError(f"{self.folder}/metadata.jsonl:{row['_line']}: no caption, captions or prompt")
        self.maps = check_maps(maps, self.columns(self.rows[0]), f"imagefolder '{self.folder}'")
        for row in self.rows:
            if missing := [m for m in self.maps if not row.get(f"{m}_file_name")]:
                raise InputError(f"{self.folder}/metadata.jsonl:{row['_line']}: no {missing[0]}_file_name")
        self._order = EpochOrder(len(self.rows), seed)

    @staticmethod
    def columns(row: dict[str, Any]) -> tuple[str, ...]:
        """The condition maps a row names (`<map>_file_name` columns)."""
        return tuple(k[: -len("_file_name")] for k in row if k.endswith("_file_name") and k != "file_name")

    def __len__(self) -> int:
        return ENDLESS

    def _read(self, name: str, what: str, rgb: bool) -> np.ndarray:
        path = self.folder / name
        if rgb:
            image = load_image(path, what=what)
        else:
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
            except (OSError, ValueError) as exc:
                raise InputError(f"{what} '{path}' is not a readable image ({exc.__class__.__name__})") from None
        if image.shape[:2] != (self.resolution, self.resolution):
            raise InputError(f"{path} is {image.shape[1]}x{image.shape[0]}, "
                             f"the model expects {self.resolution}x{self.resolution}")  # fmt: skip
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[self._order(index)]
        caps = row.get("captions") or [row.get("caption") or row.get("prompt")]
        example = {
            "pixel_values": _pixels(self._read(row["file_name"], "training image", rgb=True)),
            "caption": _pick(caps, self.seed, int(index)),
            "captions": caps,
            "scene": row.get("scene"),
            "index": int(index),
        }
        for name in self.maps:
            example[name] = torch.from_numpy(self._read(row[f"{name}_file_name"], f"'{name}' map", rgb=False).copy())
        return example


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings/dicts as lists (default_collate mangles nested scene dicts)."""
    out: dict[str, Any] = {}
    for key in examples[0]:
        vals = [e[key] for e in examples]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
