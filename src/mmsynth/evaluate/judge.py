"""The judge: score images against what they should show, one image or a folder in the exchange format.

Exchange format (written by `mmsynth data export`, and by every generator of this project):
DIR/metadata.jsonl, one JSON object per line, with "file_name" (image path relative to DIR) and any of
"prompt" (what a model was asked), "scene" (a scene spec), "caption"/"captions", "layout" (bool).
Expectation: the prompt if present, else the scene (everything it implies), else the first caption.
Boxes (layout metrics, IoU in matching) only when the line says "layout": true or the caller asks,
because a text-to-image model cannot know where the scene put its objects; then the scene (which a
layout-conditioned model was given) is the expectation even when a prompt is present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from mmsynth.data.export import METADATA
from mmsynth.data.export import read_metadata as read_folder_metadata
from mmsynth.data.render import check_resolution, render
from mmsynth.data.scene import Scene, sample_scene
from mmsynth.errors import InputError
from mmsynth.evaluate.detect import detect_objects
from mmsynth.evaluate.scoring import (
    Expectation,
    ImageScore,
    Metric,
    aggregate,
    expectation_from_prompt,
    expectation_from_scene,
    format_table,
    score_image,
)
from mmsynth.io import load_image

DEGRADE_NOISE = 10.0 / 255.0  # Gaussian noise sigma (fraction of the range)
DEGRADE_BLUR = 1.0  # Gaussian blur sigma in pixels


@dataclass
class JudgeItem:
    """One validated metadata line: where the image is and what it should show."""

    line: int
    file_name: str
    path: Path
    expectation: Expectation
    source: str  # "prompt", "scene" or "caption"


@dataclass
class JudgeReport:
    """Aggregate metrics plus every image's verdict."""

    metrics: dict[str, Metric]
    n_images: int
    images: list[dict[str, Any]] = field(default_factory=list)  # per-image verdicts (validate: failures only)
    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "images": self.images,
        }

    def table(self) -> str:
        return format_table(self.metrics, self.title)


def expectation_for(prompt: str | None = None, scene: Scene | dict | None = None, layout: bool = False) -> Expectation:
    """The prompt's expectation if given, else the scene's (with boxes only when `layout`)."""
    if prompt is not None:
        return expectation_from_prompt(prompt)
    if scene is None:
        raise InputError("judge: give a prompt or a scene to judge against")
    sc = scene if isinstance(scene, Scene) else Scene.from_dict(scene)
    exp = expectation_from_scene(sc)
    return exp if layout else exp.without_boxes()


def judge_image(
    image: np.ndarray, prompt: str | None = None, scene: Scene | dict | None = None, layout: bool = False
) -> ImageScore:
    """Detect objects in `image` (HxWx3 uint8) and apply every scoring rule against the prompt or scene."""
    return score_image(expectation_for(prompt, scene, layout), detect_objects(image))


def _field_error(where: str, msg: str) -> InputError:
    return InputError(f"{where}: {msg}")


def read_metadata(directory: str | Path, layout: bool = False) -> list[JudgeItem]:
    """Parse and validate every line of DIR/metadata.jsonl before any scoring (no partial results)."""
    root = Path(directory)
    meta = root / METADATA
    items: list[JudgeItem] = []
    for d in read_folder_metadata(root):
        n = d["_line"]
        where = f"{meta} line {n}"
        fname = d["file_name"]
        path = root / fname
        if not path.is_file():
            raise _field_error(where, f"field 'file_name': image '{path}' does not exist")
        line_layout = d.get("layout", False)
        if not isinstance(line_layout, bool):
            raise _field_error(where, f"field 'layout' must be true or false, got {line_layout!r}")
        prompt = d.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _field_error(where, f"field 'prompt' must be a string, got {type(prompt).__name__}")
        try:
            if (layout or line_layout) and "scene" in d:  # a layout-conditioned sample: the scene's boxes
                spec = Scene.from_dict(d["scene"], where=f"{where}: field 'scene'")
                exp, source = expectation_for(scene=spec, layout=True), "scene+layout"
            elif prompt is not None:
                exp, source = expectation_from_prompt(prompt), "prompt"
            elif "scene" in d:
                exp = expectation_for(scene=Scene.from_dict(d["scene"], where=f"{where}: field 'scene'"),
                                      layout=layout or line_layout)  # fmt: skip
                source = "scene"
            elif "caption" in d or "captions" in d:
                cap = d.get("caption", d.get("captions"))
                if isinstance(cap, list) and cap:
                    cap = cap[0]
                if not isinstance(cap, str):
                    raise _field_error(where, "field 'caption(s)' must be a string or a non-empty list of strings")
                exp, source = expectation_from_prompt(cap), "caption"
            else:
                raise _field_error(where, "needs a 'prompt', a 'scene' or a 'caption' to judge against")
        except InputError as exc:
            msg = str(exc)
            raise InputError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        items.append(JudgeItem(n, fname, path, exp, source))
    return items


def judge_folder(directory: str | Path, layout: bool = False, progress: bool = True) -> JudgeReport:
    """Score every image listed in DIR/metadata.jsonl; the report holds the metrics and per-image verdicts."""
    items = read_metadata(directory, layout)
    scores, images = [], []
    for it in tqdm(items, desc="judge", disable=not progress, leave=False):
        s = score_image(it.expectation, detect_objects(load_image(it.path, what=f"line {it.line} image")))
        scores.append(s)
        images.append({"file_name": it.file_name, "line": it.line, "source": it.source, **s.to_dict()})
    return JudgeReport(aggregate(scores), len(items), images, title=f"{directory}: {len(items)} images")


# ---------------------------------------------------------------- validation on renders


def degrade(image: np.ndarray, seed: int, noise: float = DEGRADE_NOISE, blur: float = DEGRADE_BLUR) -> np.ndarray:
    """Gaussian blur (sigma `blur` px), then Gaussian noise (sigma `noise` of the range), seeded."""
    f = image.astype(np.float32)
    if blur > 0:
        f = cv2.GaussianBlur(f, (0, 0), blur)
    f = f + np.random.default_rng(seed).normal(0.0, noise * 255.0, f.shape).astype(np.float32)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


CONDITIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "clean": lambda img, seed: img,
    "degraded": degrade,
}


def _validate_one(args: tuple[str, int, int, int, tuple[str, ...]]) -> list[ImageScore]:
    split, index, seed, resolution, conditions = args
    scene = sample_scene(split, index, seed)
    img = render(scene, resolution)
    exp = expectation_from_scene(scene)
    return [score_image(exp, detect_objects(CONDITIONS[c](img, seed * 1_000_003 + index))) for c in conditions]


def validate(
    n: int,
    resolution: int = 64,
    split: str = "test",
    seed: int = 0,
    conditions: Iterable[str] = ("clean", "degraded"),
    workers: int = 1,
    progress: bool = True,
) -> dict[str, JudgeReport]:
    """Judge `n` rendered scenes of `split` against their own specs (with boxes), per image condition."""
    if n < 1:
        raise InputError(f"validate: n must be >= 1, got {n}")
    check_resolution(resolution)
    conds = tuple(conditions)
    for c in conds:
        if c not in CONDITIONS:
            raise InputError(f"validate: condition '{c}' is not one of {', '.join(CONDITIONS)}")
    jobs = [(split, i, seed, resolution, conds) for i in range(n)]
    bar = {"desc": f"validate {resolution}px", "total": n, "disable": not progress, "leave": False}
    if workers > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(_validate_one, jobs, chunksize=8), **bar))
    else:
        results = [_validate_one(j) for j in tqdm(jobs, **bar)]
    out = {}
    for k, c in enumerate(conds):
        scores = [r[k] for r in results]
        failures = [
            {"index": i, **s.to_dict()} for i, s in enumerate(scores) if not s.passed
        ]  # the cases worth looking at
        title = f"{split} renders {resolution}px, {c}: {n} images"
        out[c] = JudgeReport(aggregate(scores), n, failures, title=title)
    return out
