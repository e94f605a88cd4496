"""Where the shipped zoo lives. Kept free of heavy imports: the CLI reads it to build its help."""

from __future__ import annotations

from pathlib import Path

from mmsynth.errors import InputError

DEFAULT_MODEL = "models/shapes-v1"  # the shipped text-to-image zoo bundle


def resolve_model(model: str | None = None) -> Path:
    """The bundle directory to load; the shipped zoo is looked up in the working directory, then in the checkout."""
    model = model or DEFAULT_MODEL
    path = Path(model)
    if model == DEFAULT_MODEL and not path.exists():
        checkout = Path(__file__).resolve().parents[3] / DEFAULT_MODEL
        if checkout.exists():
            return checkout
        raise InputError(
            f"the shipped Shapes zoo '{DEFAULT_MODEL}' is missing: train it with scripts/train_zoo.sh "
            "(mmsynth train clip, vae, t2i; see README), or pass --model DIR"
        )
    return path
