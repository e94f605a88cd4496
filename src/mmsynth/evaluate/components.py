"""Scores of a bundle's parts on their own: VAE reconstruction PSNR and CLIP text-to-image retrieval.

Both run on test-split scenes the models never trained on. Retrieval is scored two ways, because many
Shapes captions fit several images ("a blue star" fits every scene with one blue star):
`top1_exact` (the retrieved image is the caption's own) and `top1_consistent` (the retrieved image's
scene makes the caption true: same colour-shape groups and counts, stated sizes, and every stated
relation holds by the dataset's own rule). The zoo's bar is stated on `top1_consistent`. Each wrong
retrieval is named by what differs (`misses`; a wrong shape also by which shapes, `shape_swaps`, and by the
sizes of the objects it lost, `shape_miss_sizes` beside `object_sizes` of all the query scenes), and
`text_side_ceiling` is the retrieval an image side that matched the text tower perfectly could reach: together
they say which tower to train.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmsynth.data.captions import caption_true_of, captions, parse_caption
from mmsynth.data.render import render
from mmsynth.data.scene import Scene, sample_scene
from mmsynth.errors import InputError
from mmsynth.models.zoo import image_features, run_owners, text_features, unit_means


def _mean_ci(values: np.ndarray) -> dict[str, Any]:
    from mmsynth.evaluate.scoring import mean_ci

    return mean_ci(list(values)).to_dict()


def _rate(hits: np.ndarray) -> dict[str, Any]:
    from mmsynth.evaluate.scoring import rate

    return rate(int(hits.sum()), len(hits)).to_dict()


def _scenes(n: int, split: str, seed: int) -> list[Scene]:
    if n < 2:
        raise InputError(f"--n must be at least 2, got {n}")
    return [sample_scene(split, i, seed) for i in range(n)]


@torch.no_grad()
def vae_psnr(vae: Any, n: int = 1000, split: str = "test", seed: int = 0, resolution: int = 64,
             batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """Mean PSNR (dB, on uint8 pixels) of encode -> decode (the latent mean) over `n` renders of `split`, and
    the judge's verdict on each reconstruction against its scene (`judge_pass`): the ceiling of any model that
    draws through this VAE, since a shape the decoder blurs is a shape no latent can bring back."""
    from mmsynth.evaluate.judge import judge_image

    vae.eval()
    scenes = _scenes(n, split, seed)
    renders = np.stack([render(s, resolution) for s in scenes])
    psnrs, passes = [], []
    for k in range(0, n, batch_size):
        x = torch.from_numpy(renders[k : k + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
        mse = ((y - renders[k : k + batch_size].astype(np.float64)) ** 2).reshape(len(y), -1).mean(axis=1)
        psnrs.append(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))
        passes += [judge_image(img.astype(np.uint8), scene=sc).passed for img, sc in zip(y, scenes[k: k + batch_size])]
    return {"psnr_db": _mean_ci(np.concatenate(psnrs)), "judge_pass": _rate(np.array(passes)), "split": split,
            "resolution": resolution}


@torch.no_grad()
def clip_retrieval(clip: Any, tokenizer: Any, n: int = 1000, split: str = "test", seed: int = 0,
                   resolution: int | None = None, batch_size: int = 128) -> dict[str, Any]:  # fmt: skip
    """Text -> image retrieval among `n` test pairs (caption 0 of each scene against all renders).

    Renders are made at the CLIP's own input size unless `resolution` says otherwise.
    """
    clip.eval()
    resolution = resolution or int(clip.config.vision_config.image_size)
    scenes = _scenes(n, split, seed)
    texts = [captions(s, 1)[0] for s in scenes]
    device = next(clip.parameters()).device
    img_feats, txt_feats = [], []
    for k in range(0, n, batch_size):
        imgs = np.stack([render(s, resolution) for s in scenes[k : k + batch_size]])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0  # the zoo CLIP reads [-1, 1]
        img_feats.append(image_features(clip, x))
        txt_feats.append(text_features(clip, tokenizer, texts[k : k + batch_size]))
    query_feats = torch.cat(txt_feats)
    best = (query_feats @ torch.cat(img_feats).T).argmax(dim=1).cpu().numpy()
    exact = best == np.arange(n)
    consistent = np.array([caption_true_of(texts[i], scenes[int(j)]) for i, j in enumerate(best)])
    kinds = np.array([caption_kind(t) for t in texts])
    by_kind = {k: _rate(consistent[kinds == k]) for k in CAPTION_KINDS if (kinds == k).any()}
    missed = [(scenes[i], scenes[int(j)]) for i, j in enumerate(best) if not consistent[i]]
    miss_kinds = [retrieval_miss(q, r) for q, r in missed]
    misses = Counter(miss_kinds)
    shape_missed = [(q, r) for (q, r), kind in zip(missed, miss_kinds) if kind == "a shape"]
    swaps = Counter(s for q, r in shape_missed for s in shape_swaps(q, r))
    lost_sizes = Counter(size for q, r in shape_missed for size in lost_object_sizes(q, r))
    ceiling = {}
    for name, ideal in ideal_image_embeddings(clip, tokenizer, scenes, texts, batch_size).items():
        picks = (query_feats @ ideal.T).argmax(dim=1).cpu().numpy()
        ceiling[name] = _rate(np.array([caption_true_of(texts[i], scenes[int(j)]) for i, j in enumerate(picks)]))
    return {"top1_exact": _rate(exact), "top1_consistent": _rate(consistent), "consistent_by_kind": by_kind,
            "misses": dict(misses.most_common()), "shape_swaps": dict(swaps.most_common()),
            "shape_miss_sizes": dict(sorted(lost_sizes.items())),
            "object_sizes": dict(sorted(Counter(o.size for s in scenes for o in s.objects).items())),
            "text_side_ceiling": ceiling, "split": split}  # fmt: skip


def ideal_image_embeddings(clip: Any, tokenizer: Any, scenes: list[Scene], queries: list[str], batch_size: int = 128,
                           n_captions: int = 9, fit_steps: int = 300) -> dict[str, torch.Tensor]:  # fmt: skip
    """Two image sides that see only this text tower's embeddings of each scene's true captions other than its
    query: "prototype", the unit mean of them, and "fitted", free unit vectors (one per scene, started at the
    prototypes) trained with CLIP's loss to be retrieved by those captions among all the scenes. Retrieval of the
    queries against them is the text side's ceiling: what a vision tower that matched the text tower perfectly
    could reach, so a CLIP far below it is limited by its images, one near it by its text tower."""
    others = [[c for c in captions(s, n_captions) if c != q] or [q] for s, q in zip(scenes, queries)]
    flat = [c for cs in others for c in cs]
    feats = torch.cat([text_features(clip, tokenizer, flat[k : k + batch_size])
                       for k in range(0, len(flat), batch_size)]).float()  # fmt: skip
    counts = [len(cs) for cs in others]
    owner = run_owners(counts, feats.device)
    prototype = unit_means(feats, counts)
    scale = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
    free = torch.nn.Parameter(prototype.clone())
    opt = torch.optim.Adam([free], lr=0.01)
    with torch.enable_grad():
        for _ in range(fit_steps):
            loss = F.cross_entropy(scale * feats @ F.normalize(free, dim=-1).T, owner)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"prototype": prototype, "fitted": F.normalize(free.detach(), dim=-1)}


MISS_KINDS = ("a shape", "a colour", "shape and colour", "colours bound to other shapes", "object count",
              "size or relation")  # fmt: skip


def retrieval_miss(query: Scene, retrieved: Scene) -> str:
    """Which of MISS_KINDS tells a wrongly retrieved scene from the query's own, by their colour-shape objects:
    where a CLIP's errors lie, and so which hard negatives or capacity it lacks."""
    a, b = query.objects, retrieved.objects
    if len(a) != len(b):
        return "object count"
    if Counter((o.color, o.shape) for o in a) == Counter((o.color, o.shape) for o in b):
        return "size or relation"
    same_colours = Counter(o.color for o in a) == Counter(o.color for o in b)
    same_shapes = Counter(o.shape for o in a) == Counter(o.shape for o in b)
    if same_colours and same_shapes:
        return "colours bound to other shapes"
    return "a shape" if same_colours else "a colour" if same_shapes else "shape and colour"


def shape_swaps(query: Scene, retrieved: Scene) -> list[str]:
    """For each colour, the query's shapes the retrieved scene lacks paired with the shapes it has instead, as
    "asked->retrieved" (e.g. "cross->square"): which shapes the vision side confuses, so which shape edits its
    hard negatives most need. Unpaired leftovers (another count of that colour) are not named."""
    out = []
    for colour in sorted({o.color for o in query.objects} | {o.color for o in retrieved.objects}):
        asked = Counter(o.shape for o in query.objects if o.color == colour)
        got = Counter(o.shape for o in retrieved.objects if o.color == colour)
        out += [f"{a}->{b}" for a, b in zip(sorted((asked - got).elements()), sorted((got - asked).elements()))]
    return out


def lost_object_sizes(query: Scene, retrieved: Scene) -> list[str]:
    """The sizes of the query's objects in the colour-shape groups that the retrieved scene has fewer of (each
    object of such a group once): set beside the sizes of all objects, they say whether a CLIP's shape errors
    sit on small objects, which finer patches would resolve, or on objects of every size, which they would not."""
    groups = [Counter((o.color, o.shape) for o in scene.objects) for scene in (query, retrieved)]
    lacking = groups[0] - groups[1]
    return [o.size for o in query.objects if (o.color, o.shape) in lacking]


def with_interval(metric: dict[str, Any], digits: int = 3, unit: str = "", then: str = "") -> str:
    """A figure with its 95% interval, in the one wording that `mmsynth bench components` and the model cards use:
    "0.895 (95% CI 0.875..0.912)"; `unit` follows the value, `then` goes inside the parentheses (", n=1000")."""
    lo, hi = metric["ci95"]
    return f"{metric['value']:.{digits}f}{unit} (95% CI {lo:.{digits}f}..{hi:.{digits}f}{then})"


def miss_lines(clip_scores: dict[str, Any]) -> list[str]:
    """What the wrong retrievals of `clip_retrieval`'s scores got wrong, as the lines `mmsynth bench components`
    prints and a model card quotes (one wording for both)."""
    lines = ["wrong retrievals, by what differs: " + (", ".join(
        f"{k} {n}" for k, n in clip_scores["misses"].items()) or "none")]  # fmt: skip
    if clip_scores.get("shape_swaps"):
        lines.append("shapes confused in those with a shape wrong (asked->retrieved): " + ", ".join(
            f"{k} {n}" for k, n in clip_scores["shape_swaps"].items()))  # fmt: skip
    if clip_scores.get("shape_miss_sizes"):
        total = sum(clip_scores["object_sizes"].values())
        lines.append("sizes of the objects those lost: " + ", ".join(
            f"{k} {n}" for k, n in clip_scores["shape_miss_sizes"].items()) + " (all objects of the queries' scenes: "
            + ", ".join(f"{k} {n / total:.2f}" for k, n in clip_scores["object_sizes"].items()) + ")")  # fmt: skip
    return lines


CAPTION_KINDS = ("one object", "count", "two groups", "three or more groups")


def caption_kind(caption: str) -> str:
    """Which of CAPTION_KINDS a caption is, by the colour-shape groups it names: where retrieval fails."""
    gs = parse_caption(caption).groups
    if len(gs) == 1:
        return "one object" if gs[0].count == 1 else "count"
    return "two groups" if len(gs) == 2 else "three or more groups"
