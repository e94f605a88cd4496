"""Mined hard negatives for CLIP: the training scenes a trained CLIP confuses with each other.

The zoo's retrieval misses are scenes one or two words from the query's own (a cyan star over a green cross
retrieves a green star beside a cyan square), while synthetic edits (`data.scene.minimal_edit`) change one
word and random in-batch negatives almost never come that close. Mining asks the CLIP itself which scenes of a
large pool each caption would retrieve wrongly, so each batch holds exactly its current mistakes (hard negative
mining as in ANCE, Xiong et al. 2021, here once before a stage). A mined scene is never one the caption is true
of, nor one whose own captions are true of the source, so no neighbour is a false negative.

An experiment: the clip recipe's `mined_negatives` option that read these tables was measured and removed
(docs/experiments/training-options.md); experiments/probes/mine_clip_negatives.py still writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsynth.data.annotations import N_CAPTIONS
from mmsynth.data.captions import caption_true_of, captions, parse_caption
from mmsynth.data.render import render
from mmsynth.data.scene import sample_scene
from mmsynth.errors import InputError
from mmsynth.models.zoo import image_features, text_features

TABLE_KEYS = ("split", "seed", "group", "block", "sources", "neighbours")


@torch.no_grad()
def mine_confusions(clip: Any, tokenizer: Any, split: str, seed: int, n_sources: int, group: int = 2,
                    per_source: int = 2, block: int = 32, shortlist: int = 64, batch_size: int = 256,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """For the `n_sources` scenes at indices 0, group, 2*group, ... of (split, seed) (the sources of
    `HardNegativePairs(split, seed, group=group)`), the `per_source` other sources that score highest against any
    of the source's training captions while making none of them true, and none of whose captions the source
    makes true. Within each `block` of consecutive sources (one training batch's groups) no scene is used twice,
    so a batch never holds a scene twice. `progress(k)` is called after each chunk of k scenes embedded."""
    if n_sources < per_source + 1 or per_source < 1 or block < 1:
        raise InputError(f"mining needs n_sources > per_source >= 1 and block >= 1, got n_sources={n_sources}, "
                         f"per_source={per_source}, block={block}")  # fmt: skip
    clip.eval()
    device = next(clip.parameters()).device
    resolution = int(clip.config.vision_config.image_size)
    indices = np.arange(n_sources) * group
    scenes = [sample_scene(split, int(i), seed) for i in indices]
    caps = [captions(s, N_CAPTIONS) for s in scenes]
    images, texts = [], []
    for k in range(0, n_sources, batch_size):
        x = torch.from_numpy(np.stack([render(s, resolution) for s in scenes[k : k + batch_size]]))
        x = x.permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
        images.append(image_features(clip, x).float())
        feats = text_features(clip, tokenizer, [c for cs in caps[k : k + batch_size] for c in cs]).float()
        texts.append(feats.view(-1, N_CAPTIONS, feats.shape[-1]))
        if progress:
            progress(len(x))
    image, text = torch.cat(images), torch.cat(texts)
    parsed = [[parse_caption(c) for c in cs] for cs in caps]
    neighbours = np.zeros((n_sources, per_source), dtype=np.int64)
    for start in range(0, n_sources, batch_size):
        # each source's best score against every image: the max over its captions
        scores = torch.einsum("scd,nd->scn", text[start : start + batch_size], image).amax(dim=1)
        top = scores.topk(min(shortlist, n_sources), dim=1).indices.cpu().numpy()
        for row, s in enumerate(range(start, min(start + batch_size, n_sources))):
            if s % block == 0:
                used = set(range(s, min(s + block, n_sources)))  # the block's sources are in the batch already
            picked = [int(j) for j in top[row] if j not in used and _confusable(parsed, scenes, s, int(j))]
            picked = picked[:per_source]
            rng = np.random.default_rng([seed, s, 0x3A1])
            for j in rng.permutation(n_sources):  # a shortlist with too few: fill with random unrelated sources
                if len(picked) == per_source:
                    break
                if int(j) not in used and int(j) not in picked and _confusable(parsed, scenes, s, int(j)):
                    picked.append(int(j))
            if len(picked) < per_source:
                raise InputError(f"mining: source {s} has fewer than {per_source} unrelated sources outside its "
                                 f"batch; mine more sources or a smaller batch")  # fmt: skip
            used.update(picked)
            neighbours[s] = indices[picked]
    return {"split": split, "seed": seed, "group": group, "block": block, "sources": indices, "neighbours": neighbours}


def _confusable(parsed: list[list[Any]], scenes: list[Any], s: int, j: int) -> bool:
    """Whether source j may stand as a negative of source s: another scene, none of s's captions true of it and
    none of its captions true of s."""
    return j != s and not any(caption_true_of(p, scenes[j]) for p in parsed[s]) \
        and not any(caption_true_of(p, scenes[s]) for p in parsed[j])  # fmt: skip


def save_table(table: dict[str, Any], path: str | Path) -> Path:
    """Write a mined table as .npz atomically (a temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(table[k]) for k in TABLE_KEYS})
    tmp.replace(path)
    return path


def load_table(path: str | Path) -> dict[str, Any]:
    """A table written by `save_table`, with a clear message for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mined table: no file at {path} (write one with "
                         "experiments/probes/mine_clip_negatives.py)")  # fmt: skip
    try:
        with np.load(path) as data:
            table = {k: data[k] for k in TABLE_KEYS}
    except (KeyError, ValueError, OSError) as err:
        raise InputError(f"{path} is not a mined table "
                         f"(keys {', '.join(TABLE_KEYS)}): {err}") from None  # fmt: skip
    table["split"] = str(table["split"])
    for key in ("seed", "group", "block"):
        table[key] = int(table[key])
    return table
