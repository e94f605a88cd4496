"""Model bundles (diffusers/transformers formats), the Shapes tokenizer and the Shapes zoo.

`Bundle` is imported lazily, so light users (the CLI's help, `shipped`) do not load diffusers.
"""

from mmsynth.lazy import lazy_exports

# the model classes a bundle's component manifest may name with library "mmsynth" (models/components.LIBRARIES)
_EXPORTS: dict[str, str] = {"Bundle": "mmsynth.models.bundle", "ComposerConditioner": "mmsynth.models.composer",
                             "ExemplarEncoder": "mmsynth.models.exemplar_encoder"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
