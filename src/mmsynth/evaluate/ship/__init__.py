"""Shipping the Shapes zoo (`mmsynth zoo ship t2i|clip|inpainting`): each part is copied into a temporary copy of the
bundle, measured there by the bench commands its card quotes, carded, and renamed into place only if it is accepted.

It sits in evaluate because shipping is measuring: it assembles model parts (models), reads training runs (train) and
runs the bench; the CLI hands it the bench's entry point (`Bench`) so that it never imports the CLI.
"""

from mmsynth.evaluate.ship.clip import ship_clip
from mmsynth.evaluate.ship.common import Bench
from mmsynth.evaluate.ship.inpainting import ship_inpainting
from mmsynth.evaluate.ship.t2i import ship_t2i

__all__ = ["Bench", "ship_clip", "ship_inpainting", "ship_t2i"]
