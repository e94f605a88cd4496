"""How far apart a CLIP's text tower puts captions that differ in one respect (relation, binding, shape, colour).

    python scripts/text_tower_probe.py [--model models/shapes-v1] [--caption "a red circle left of a blue square"]

Prints, per variant, two cosines with --caption:
- pooled: the pooled, projected CLIP text embeddings (what retrieval compares). A variant of other meaning
  near 1 is a caption the tower cannot tell apart, so no image side can either; a paraphrase (same meaning)
  should sit nearer than any of them.
- tokens: the bundle's text encoder's last hidden states (what the UNet cross-attends to), at the token where
  the two captions differ most (the minimum over positions of the per-token cosine). Near 1, the UNet gets
  the same conditioning for both captions and cannot draw them differently.
"""

from __future__ import annotations

import argparse

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
    from mmsynth.evaluate.components import text_features
    from mmsynth.models.bundle import load_component

    clip, tok = load_component(model, "clip").float().eval(), load_component(model, "tokenizer")
    e = text_features(clip, tok, [caption, *variants.values()])
    return dict(zip(variants, (e[0] @ e[1:].T).tolist()))


def token_cosines(model: str, caption: str, variants: dict[str, str]) -> dict[str, float]:
    """Per variant: the lowest per-token cosine of the text encoder's last hidden states with `caption`'s."""
    import torch

    from mmsynth.models.bundle import load_component
    from mmsynth.models.tokenizer import tokenize_padded

    encoder, tok = load_component(model, "text_encoder").float().eval(), load_component(model, "tokenizer")
    texts = [caption, *variants.values()]
    ids = tokenize_padded(tok, texts, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(ids.input_ids)[0]
    n = int(ids.attention_mask.sum(1).max()) + 1  # every real token and the first end token
    cos = torch.nn.functional.cosine_similarity(hidden[:1, :n], hidden[1:, :n], dim=-1)
    return dict(zip(variants, cos.min(dim=1).values.tolist()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-v1", help="a folder with clip/ and tokenizer/")
    p.add_argument("--caption", default="a red circle left of a blue square",
                   help="the reference caption (the default variants are written for the default one)")
    a = p.parse_args(argv)
    pooled, tokens = probe(a.model, a.caption, VARIANTS), token_cosines(a.model, a.caption, VARIANTS)
    print("pooled  tokens  variant")
    for name in VARIANTS:
        print(f"{pooled[name]:.3f}   {tokens[name]:.3f}   {name}: {VARIANTS[name]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
