"""Best-of-K sampling: draw K candidates per image and keep the one the bundle's CLIP finds closest to its prompt.

The reranking of DALL-E (Ramesh et al. 2021: 512 samples per caption, ranked by CLIP) at a small K, as a
generation option (`GenerationRequest.best_of`, `mmsynth generate --best-of K`). Every candidate is a full run
of the one sampler with the request's controls; candidate j of image i has seed `seed + i + j * CANDIDATE_STRIDE`,
so candidate 0 is the image plain sampling gives, and a per-image request (seed + i, best_of K) reproduces the
same K candidates and the same choice on its own. The scorer is the bundle's CLIP (clip/), the image-text
cosine of `guides.ClipGuide`: it knows what the CLIP knows (on the Shapes zoo: objects, colours and counts well,
spatial relations hardly), so best-of-K helps exactly where the CLIP sees more than the UNet draws.

Inside `shared_candidates()` a candidate is drawn once and reused by every later request that needs it (the
same request but for best_of): a bench sweep `best_of=2,4,8` then draws 8 candidates per image, not 14, and
each K's pick is among the very candidates the smaller K saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmsynth.errors import InputError

if TYPE_CHECKING:
    from mmsynth.models.bundle import Bundle
    from mmsynth.sample.controls import Control
    from mmsynth.sample.request import GenerationRequest
    from mmsynth.sample.sampler import SampleResult

CANDIDATE_STRIDE = 1_000_003  # seed offset between candidates: far from the seed + i of the images of a batch


@dataclasses.dataclass
class SharedDraws:
    """The candidates drawn inside a `shared_candidates()` block, by (bundle id, candidate request JSON), each
    kept with its bundle (so the id cannot be reused), and how many draws were served from here so far."""

    draws: dict[tuple[int, str], tuple[Bundle, SampleResult, np.ndarray]] = dataclasses.field(default_factory=dict)
    reused: int = 0


_shared: SharedDraws | None = None


@contextlib.contextmanager
def shared_candidates() -> Iterator[SharedDraws]:
    """Within the block, each candidate (bundle, request without best_of, candidate seed; requests without
    controls) is sampled and scored once: rows of one bench run that differ only in best_of share their draws
    (a row that reused some costs less than it would alone: `SharedDraws.reused` says so). Held in memory until
    the outermost block ends (a 64 x 64 candidate: about 16 KB)."""
    global _shared
    outer = _shared
    _shared = SharedDraws() if outer is None else outer
    try:
        yield _shared
    finally:
        _shared = outer


def candidate_seed(seed: int, j: int) -> int:
    """The seed of candidate j of an image whose own seed is `seed` (candidate 0: the image itself)."""
    return seed + j * CANDIDATE_STRIDE


def check_best_of(bundle: Bundle, request: GenerationRequest) -> None:
    """Raise InputError when best-of-K cannot score this request: no CLIP in the bundle, or an empty prompt."""
    if getattr(bundle, "clip", None) is None:
        raise InputError("best_of > 1 ranks candidates with the bundle's CLIP, and this model bundle has none "
                         "(clip/ folder); train one with `mmsynth train clip`, or use best_of 1")  # fmt: skip
    from mmsynth.sample.request import MAX_SEED

    if candidate_seed(request.seed + request.n - 1, request.best_of - 1) > MAX_SEED:
        raise InputError(f"seed {request.seed} is too large for best_of {request.best_of}: candidate seeds add "
                         f"{CANDIDATE_STRIDE} per candidate and must stay <= {MAX_SEED}")  # fmt: skip
    empty = [i for i, p in enumerate(request.prompts()) if not p.strip()]
    if empty:
        raise InputError(f"best_of > 1 ranks candidates by their prompt, and image {empty[0]} has an empty prompt; "
                         "give a prompt or use best_of 1")  # fmt: skip


@torch.no_grad()
def clip_distances(bundle: Bundle, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """1 - cosine(CLIP image, CLIP text) of image i against prompt i (lower: closer), float64 per image."""
    from mmsynth.sample.guides import ClipGuide

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.to(bundle.clip.device)
    out = np.zeros(len(prompts))
    for prompt in dict.fromkeys(prompts):  # one text embedding per distinct prompt
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        guide = ClipGuide(bundle.clip, bundle.tokenizer, text=prompt, processor=getattr(bundle, "clip_processor", None))
        out[idx] = guide(x[idx]).double().cpu().numpy()
    return out


def sample_best_of(bundle: Bundle, request: GenerationRequest, controls: list[Control], progress: bool = True,
                   decode: bool = True) -> SampleResult:  # fmt: skip
    """`request.n` images, each the CLIP's pick among `request.best_of` candidates (see the module docstring).

    The result's `selection` says, per image, which candidate won and every candidate's CLIP distance.
    """
    from mmsynth.sample.sampler import SampleResult, run_loop

    check_best_of(bundle, request)
    k = request.best_of
    prompts = request.prompts()
    single = dataclasses.replace(request, best_of=1)
    runs = []
    for j in range(k):
        candidate = dataclasses.replace(single, seed=candidate_seed(request.seed, j))
        key = (id(bundle), candidate.to_json()) if _shared is not None and not controls else None
        if key is not None and key in _shared.draws:  # (its bundle is kept in it: that id is this bundle's)
            drawn = _shared.draws[key][1:]
            _shared.reused += 1
        else:
            run = run_loop(bundle, candidate, controls, progress=progress, decode=True)  # `request` records them
            drawn = (run, clip_distances(bundle, run.images, prompts))
            if key is not None:
                _shared.draws[key] = (bundle, *drawn)
        runs.append(drawn)
    dist = np.stack([d for _, d in runs])  # K x n
    best = dist.argmin(axis=0)
    images = np.stack([runs[int(j)][0].images[i] for i, j in enumerate(best)])
    latents = torch.stack([runs[int(j)][0].latents[i] for i, j in enumerate(best)])
    selection = [{"best_of": k, "chosen": int(j), "seed": candidate_seed(request.seed + i, int(j)),
                  "clip_distance": [round(float(d), 6) for d in dist[:, i]]} for i, j in enumerate(best)]  # fmt: skip
    if not decode:
        images = images[:0]
    return SampleResult(images, latents, [request.for_image(i) for i in range(request.n)], selection)

