"""Model bundles (diffusers/transformers formats), the Shapes tokenizer and the Shapes zoo.

`Bundle` is imported lazily, so light users (the CLI's help, `shipped`) do not load diffusers.
"""

from mmsynth.lazy import lazy_exports

_EXPORTS: dict[str, str] = {"Bundle": "mmsynth.models.bundle"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
