"""How far apart a CLIP's text tower puts captions that differ in one respect (relation, binding, shape, colour).

    python scripts/text_tower_probe.py [--model models/shapes-v1] [--caption "a red circle left of a blue square"]

Prints the cosine between the pooled, projected text embedding of --caption and of each variant. A variant
of other meaning near 1 is a caption the tower cannot tell apart, so no image side can either; a paraphrase
(same meaning) should sit nearer than any of them.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-v1", help="a folder with clip/ and tokenizer/")
    p.add_argument("--caption", default="a red circle left of a blue square",
                   help="the reference caption (the default variants are written for the default one)")
    a = p.parse_args(argv)
    for name, cos in probe(a.model, a.caption, VARIANTS).items():
        print(f"{cos:.3f}  {name}: {VARIANTS[name]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
