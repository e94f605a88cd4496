"""How far apart a CLIP's text tower puts captions that differ in one respect (relation, binding, shape, colour).

    python experiments/probes/text_tower_probe.py [--model models/shapes-v1]
        [--caption "a red circle left of a blue square"]

Prints, per variant, two cosines with --caption:
- pooled: the pooled, projected CLIP text embeddings (what retrieval compares). A variant of other meaning
  near 1 is a caption the tower cannot tell apart, so no image side can either; a paraphrase (same meaning)
  should sit nearer than any of them.
- tokens: the bundle's text encoder's last hidden states (what the UNet cross-attends to), at the token where
  the two captions differ most (the minimum over positions of the per-token cosine). Near 1, the UNet gets
  the same conditioning for both captions and cannot draw them differently.

Then a relation readout over `--n` template captions ("a red circle left of a blue square", any colours,
shapes and relation phrase): the held-out accuracy of a linear classifier of the relation (4 classes, chance
0.25) on the mean of the real tokens' last hidden states (is the relation in them at all?), and the flip size,
|h - h_flipped| / |h| at the token the flip moves most, averaged (how loud it is next to the rest of the caption).
"""

from __future__ import annotations

import argparse
from typing import Any

VARIANTS = {
    "paraphrase (same meaning)": "a blue square right of a red circle",
    "relation flipped": "a red circle right of a blue square",
    "colours swapped": "a blue circle left of a red square",
    "shapes swapped": "a red square left of a blue circle",
    "one colour changed": "a red circle left of a green square",
    "one shape changed": "a red star left of a blue square",
}


def probe(model: str, caption: str, variants: dict[str, str]) -> dict[str, float]:
    """Cosine between `caption` and each variant under the bundle's CLIP text tower."""
    from mmsynth.models.bundle import load_component
    from mmsynth.models.zoo import text_features

    clip, tok = load_component(model, "clip").float().eval(), load_component(model, "tokenizer")
    e = text_features(clip, tok, [caption, *variants.values()])
    return dict(zip(variants, (e[0] @ e[1:].T).tolist()))


def last_hidden_states(encoder: Any, tok: Any, texts: list[str], batch: int = 500) -> tuple[Any, Any]:
    """The text encoder's last hidden states of `texts` (padded as the UNet sees them) and their attention mask."""
    import torch

    from mmsynth.models.tokenizer import tokenize_padded

    ids = tokenize_padded(tok, texts, return_tensors="pt")
    with torch.no_grad():
        hidden = torch.cat([encoder(ids.input_ids[i : i + batch])[0] for i in range(0, len(texts), batch)])
    return hidden, ids.attention_mask


def token_cosines(model: str, caption: str, variants: dict[str, str]) -> dict[str, float]:
    """Per variant: the lowest per-token cosine of the text encoder's last hidden states with `caption`'s."""
    import torch

    from mmsynth.models.bundle import load_component

    encoder, tok = load_component(model, "text_encoder").float().eval(), load_component(model, "tokenizer")
    hidden, mask = last_hidden_states(encoder, tok, [caption, *variants.values()])
    n = int(mask.sum(1).max()) + 1  # every real token and the first end token
    cos = torch.nn.functional.cosine_similarity(hidden[:1, :n], hidden[1:, :n], dim=-1)
    return dict(zip(variants, cos.min(dim=1).values.tolist()))


def relation_readout(model: str, n: int = 4000, seed: int = 0) -> dict[str, float]:
    """Held-out linear relation accuracy on the mean real-token hidden state, and the mean relative flip size."""
    import random

    import torch

    from mmsynth.data import vocab
    from mmsynth.data.captions import REL_PHRASES, flip_relations
    from mmsynth.models.bundle import load_component

    encoder, tok = load_component(model, "text_encoder").float().eval(), load_component(model, "tokenizer")
    rng, relations = random.Random(seed), list(REL_PHRASES)
    texts, labels = [], []
    for _ in range(n):
        (c1, c2), s1, s2 = rng.sample(list(vocab.COLORS), 2), rng.choice(vocab.SHAPES), rng.choice(vocab.SHAPES)
        label = rng.randrange(len(relations))
        texts.append(f"a {c1} {s1} {rng.choice(REL_PHRASES[relations[label]])} a {c2} {s2}")
        labels.append(label)

    h, mask = last_hidden_states(encoder, tok, texts)
    x = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y, cut = torch.tensor(labels), n * 3 // 4
    weight = torch.zeros(x.shape[1], len(relations), requires_grad=True)
    bias = torch.zeros(len(relations), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:cut] @ weight + bias, y[:cut]) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        opt.step()
    accuracy = float(((x[cut:] @ weight + bias).argmax(1) == y[cut:]).float().mean())
    # the flip keeps the phrase's token count, so h and flipped align token by token
    flipped, _ = last_hidden_states(encoder, tok, [flip_relations(t) or t for t in texts])
    size = ((h - flipped).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-8)).amax(dim=1)
    return {"relation_readout": accuracy, "flip_size": float(size.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-v1", help="a folder with clip/ and tokenizer/")
    p.add_argument("--caption", default="a red circle left of a blue square",
                   help="the reference caption (the default variants are written for the default one)")
    p.add_argument("--n", type=int, default=4000, help="template captions for the relation readout (0: skip it)")
    a = p.parse_args(argv)
    from pathlib import Path

    has_clip = (Path(a.model) / "clip").is_dir()  # a UNet run with its own text encoder exports none
    pooled = probe(a.model, a.caption, VARIANTS) if has_clip else {}
    tokens = token_cosines(a.model, a.caption, VARIANTS)
    print("pooled  tokens  variant" + ("" if has_clip else "   (no clip/ in the model: pooled n/a)"))
    for name in VARIANTS:
        shown = f"{pooled[name]:.3f}" if name in pooled else "  n/a"
        print(f"{shown}   {tokens[name]:.3f}   {name}: {VARIANTS[name]!r}")
    if a.n > 0:
        r = relation_readout(a.model, a.n)
        print(f"relation readout (linear, mean token, held-out; chance 0.25): {r['relation_readout']:.3f}; "
              f"flip size |dh|/|h| at the most moved token: {r['flip_size']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
