"""The `fidelity` suite: how close generated images are to real renders, and how varied they are.

Cases: n `reference` cases (renders of distinct test scenes: the real set) and n generated cases in groups of
GROUP_SIZE that share a prompt and scene and differ in seed (diversity is measured within a group). Metrics, on
the run's feature extractor (default: the bundle's CLIP vision tower, `fd_shapesclip` / `kid_shapesclip`; with
local Inception weights, real `fid` / `kid`): Frechet distance, KID (mean; unbiased at small n), k-NN
precision/recall (k=3, Kynkaanniemi et al.), diversity (mean pairwise feature distance within a prompt).
LPIPS and CLIP score are reported as unavailable: they need local weights this version does not take.
Rows: ground_truth (renders of the generated cases' scenes: the metric's floor), base_uncond, t2i. Exact
duplicate images count once (the ground truth renders one image per scene, so it has no diversity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmsynth.data.captions import captions
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.evaluate.bench.cases import Case
from mmsynth.evaluate.bench.generation import (
    SAMPLER_SETTINGS,
    RunContext,
    base_unconditioned,
    base_unconditioned_batch,
    ground_truth,
    text_to_image,
    text_to_image_batch,
)
from mmsynth.evaluate.bench.registry import Panel, Row, RowScore, Suite, register_suite
from mmsynth.evaluate.scoring import Metric

GROUP_SIZE = 4
PR_K = 3
KID_SUBSETS = 50
_REAL_STREAM, _FAKE_STREAM = 3_000_000, 4_000_000
UNAVAILABLE = {
    "lpips": "needs local LPIPS network weights; not supported in this version",
    "clip_score": "needs a local general-domain CLIP; not supported in this version",
}


def make_cases(n: int, seed: int) -> list[Case]:
    """n real (reference) cases and n generated cases in groups of GROUP_SIZE (2 when n < 8)."""
    k = GROUP_SIZE if n >= 2 * GROUP_SIZE else 2
    out = []
    for j in range(n):
        s = sample_scene("test", _REAL_STREAM + j, seed)
        out.append(Case(id=f"fidelity/real/{j:04d}", suite="fidelity", scene=s, category="real", reference=True,
                        prompt=captions(s, 1)[0], seed=seed * 1_000_003 + j, extra={"make_seed": seed}))  # fmt: skip
    for j in range(n):
        g = j // k
        s = sample_scene("test", _FAKE_STREAM + g, seed)
        out.append(Case(id=f"fidelity/gen/{j:04d}", suite="fidelity", scene=s, category="generated",
                        prompt=captions(s, 1)[0], group=f"g{g:04d}", seed=seed * 1_000_003 + n + j,
                        extra={"make_seed": seed}))  # fmt: skip
    return out


def fidelity_metrics(
    real: torch.Tensor, fake: torch.Tensor, features, groups: list[str | None] | None = None, seed: int = 0
) -> tuple[dict[str, Metric], dict[str, str]]:
    """Every fidelity metric of two uint8 (N, 3, S, S) sets at the extractor's size; a metric that needs more
    images than given is returned as unavailable with the count it needs (never a made-up number)."""
    from mmsynth.evaluate.bench.extractors import metric_names
    from mmsynth.evaluate.fidelity import diversity, features_of, frechet_distance, kernel_distance, precision_recall

    fd_name, kid_name = metric_names(features.name)
    n_r, n_f = real.shape[0], fake.shape[0]
    metrics: dict[str, Metric] = {}
    unavailable: dict[str, str] = {}

    def need(name: str, k: int) -> bool:
        if min(n_r, n_f) < k:
            unavailable[name] = f"needs at least {k} images per side, got {n_r} real and {n_f} generated"
            return False
        return True

    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID draws random subsets
        if need(fd_name, 2):
            metrics[fd_name] = Metric(frechet_distance(real, fake, features), min(n_r, n_f))
        if need(kid_name, 2):
            mean, _ = kernel_distance(real, fake, features, subsets=KID_SUBSETS)  # subsets of min(n): no spread
            metrics[kid_name] = Metric(mean, min(n_r, n_f))
    rf, ff = features_of(real, features), features_of(fake, features)
    if need("precision", PR_K + 1):
        p, r = precision_recall(rf, ff, k=PR_K)
        metrics["precision"] = Metric(p, n_f)
        metrics["recall"] = Metric(r, n_r)
    else:
        unavailable["recall"] = unavailable["precision"]
    if groups is not None:
        by: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            if g is not None:
                by.setdefault(g, []).append(i)
        sets = [ff[idx] for idx in by.values() if len(idx) >= 2]
        if sets:
            metrics["diversity"] = Metric(diversity(sets), len(sets))
        else:
            unavailable["diversity"] = "needs groups of at least 2 distinct images sharing a prompt (field 'group')"
    return metrics, unavailable


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    from mmsynth.evaluate.fidelity import resize_uint8

    arr = np.stack([resize_uint8(np.ascontiguousarray(i), size) for i in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def unique(images: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Images with exact duplicates dropped (first kept) and the positions kept: a duplicate adds no information
    and collapses k-NN radii to 0 (the ground-truth row renders one image per scene for a group of seeds)."""
    seen: set[bytes] = set()
    kept, idx = [], []
    for i, img in enumerate(images):
        key = np.ascontiguousarray(img).tobytes() + bytes(str(img.shape), "ascii")
        if key not in seen:
            seen.add(key)
            kept.append(img)
            idx.append(i)
    return kept, idx


def score(ctx: RunContext, cases: list[Case], images: list[np.ndarray], references: list[Case]) -> RowScore:
    if not references:
        raise InputError("fidelity suite: the case set has no reference cases (\"reference\": true), the real set")
    features = ctx.features()
    real = to_tensor(unique([c.render() for c in references])[0], features.size)
    kept, idx = unique(images)
    fake = to_tensor(kept, features.size)
    seed = references[0].seed
    metrics, unavailable = fidelity_metrics(real, fake, features, [cases[i].group for i in idx], seed=seed)
    unavailable.update(UNAVAILABLE)
    return RowScore(metrics, unavailable, [None] * len(cases))


def panel(case: Case, image: np.ndarray, verdict: object) -> Panel:
    return [("spec", case.render()), ("output", image)]


def _gt_needs(case: Case) -> list[str]:
    return []


SUITE = register_suite(
    Suite(
        name="fidelity",
        description="fidelity and diversity vs test renders (Frechet distance, KID, precision/recall, diversity)",
        make_cases=make_cases,
        score=score,
        panel=panel,
        headline=None,
        higher_is_better=False,
        default_n=500,
        quick_n=8,
        needs_model_to_score=True,
        rows={
            "ground_truth": Row("ground_truth", "reference", "renders of the generated cases' scenes (the floor)",
                                ground_truth, needs=_gt_needs, uses_model=False),
            "base_uncond": Row("base_uncond", "reference", "base model, empty prompt", base_unconditioned,
                               generate_batch=base_unconditioned_batch,
                               needs=_gt_needs),
            "t2i": Row("t2i", "method", "base model with the prompt", text_to_image,
                       generate_batch=text_to_image_batch,
                       sweepable=SAMPLER_SETTINGS),
        },
    )
)


# ---------------------------------------------------------------- any two folders (`mmsynth bench fidelity`)

MIN_FOLDER_IMAGES = PR_K + 1  # the most any metric here needs (precision/recall with k=3)
_OTHER_IMAGES = (".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def png_files(folder: str | Path, what: str) -> list[Path]:
    """Every PNG under `folder` (sorted, recursively); other image formats are refused, not silently used."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{what} '{root}' does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".png")
    others = [p for p in root.rglob("*") if p.suffix.lower() in _OTHER_IMAGES]
    if others:
        raise InputError(
            f"{what} '{root}' has {len(others)} non-PNG image(s), e.g. '{others[0].name}': fidelity reads PNG only "
            "(JPEG artefacts change the metrics); convert them losslessly first"
        )
    if len(files) < MIN_FOLDER_IMAGES:
        raise InputError(
            f"{what} '{root}' has {len(files)} PNG image(s); fidelity needs at least {MIN_FOLDER_IMAGES} per folder "
            f"(precision/recall use k={PR_K} neighbours), and hundreds for stable numbers"
        )
    return files


def folder_fidelity(real_dir: str | Path, fake_dir: str | Path, features, seed: int = 0) -> RowScore:
    """Fidelity of two image folders; images of any size are resized once (PIL bicubic) to the extractor's input.
    Diversity treats the whole fake folder as one group (folders carry no prompts)."""
    from mmsynth.io import load_image

    real_files, fake_files = png_files(real_dir, "--real"), png_files(fake_dir, "--fake")
    real = to_tensor([load_image(p, "--real image") for p in real_files], features.size)
    fake = to_tensor([load_image(p, "--fake image") for p in fake_files], features.size)
    metrics, unavailable = fidelity_metrics(real, fake, features, ["all"] * len(fake_files), seed=seed)
    unavailable.update(UNAVAILABLE)
    return RowScore(metrics, unavailable)
