"""Model bundles (diffusers/transformers formats), the Shapes tokenizer and the Shapes zoo.

`Bundle` is imported lazily, so light users (the CLI's help, `shipped`) do not load diffusers.
"""

from typing import Any

__all__ = ["Bundle"]


def __getattr__(name: str) -> Any:
    if name == "Bundle":
        from mmsynth.models.bundle import Bundle

        return Bundle
    raise AttributeError(f"module 'mmsynth.models' has no attribute {name!r}")
