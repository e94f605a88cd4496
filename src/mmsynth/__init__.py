"""mmsynth: multimodal, controllable image synthesis and editing, scored against exact ground truth."""

__version__ = "0.1.0"
