"""Model bundles (diffusers/transformers formats), the Shapes tokenizer and the Shapes zoo."""

from mmsynth.models.bundle import Bundle

__all__ = ["Bundle"]
