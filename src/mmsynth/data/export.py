"""Export scenes in the Hugging Face `imagefolder` layout, the project's exchange format.

DIR/metadata.jsonl has one JSON object per image: `file_name` (the RGB render), `<map>_file_name`
for each condition map (loaded by `datasets` as extra image columns), `caption`, `captions`,
`scene` (the full spec: the one source of truth) and `annotations` (boxes, relations, counts, ...).
The same layout, with `prompt` instead of captions, is what `mmsynth generate` writes and
`mmsynth judge` scores.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmsynth.data.annotations import MAP_NAMES, annotate_scene
from mmsynth.data.render import check_resolution
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.io import atomic_dir, check_output_dir, read_jsonl

METADATA = "metadata.jsonl"


def export_split(
    split: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    resolution: int = 64,
    start: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write scenes start..start+n-1 of `split` to `out`; built in a temp dir and renamed, so never half-written."""
    if n <= 0:
        raise InputError(f"--n must be a positive number of images, got {n}")
    check_resolution(resolution)
    out = check_output_dir(out, "output", overwrite=overwrite)
    sample_scene(split, start, seed)  # validate the split before writing anything
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for name in MAP_NAMES:
            (tmp / "conditions" / name).mkdir(parents=True)
        with open(tmp / METADATA, "w", encoding="utf-8") as meta:
            for index in tqdm(range(start, start + n), desc=f"export {split}", disable=not progress):
                scene = sample_scene(split, index, seed)
                ann = annotate_scene(scene, resolution)
                stem = f"{index:06d}.png"  # no split name in file names: datasets would read it as a split
                Image.fromarray(ann.image).save(tmp / "images" / stem)
                row = {"file_name": f"images/{stem}"}
                for name in MAP_NAMES:
                    Image.fromarray(ann.maps[name]).save(tmp / "conditions" / name / stem)
                    row[f"{name}_file_name"] = f"conditions/{name}/{stem}"
                caps = ann.records["captions"]
                row.update(caption=caps[0], captions=caps, scene=scene.to_dict(), annotations=ann.records)
                meta.write(json.dumps(row) + "\n")
    return out


def read_metadata(folder: str | Path) -> list[dict]:
    """Read DIR/metadata.jsonl: every line a JSON object with a string `file_name`.

    Errors name the file, the line and the field. Each row gets `_line` (its line number) so later
    checks can name it too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a directory (expected a folder with {METADATA})")
    path = folder / METADATA
    if not path.is_file():
        raise InputError(f"'{path}' does not exist (expected one JSON object per line with 'file_name')")
    rows = []
    for lineno, row, where in read_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise InputError(f"{where}: field 'file_name' is missing or not a string (image path relative to DIR)")
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise InputError(f"'{path}' has no entries")
    return rows
