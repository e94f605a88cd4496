"""Shipping the Shapes zoo (`mmsynth zoo ship t2i|clip|inpainting|control`): each part is copied into a temporary
copy of the bundle, measured there by the bench commands its card quotes, carded, and renamed into place only if it
is accepted; `mmsynth zoo curve` measures a control run's snapshots (curve.py).

It sits in evaluate because shipping is measuring: it assembles model parts (models), reads training runs (train) and
runs the bench; the CLI hands it the bench's entry point (`Bench`) so that it never imports the CLI.
"""

from mmsynth.evaluate.ship.clip import ship_clip
from mmsynth.evaluate.ship.common import Bench
from mmsynth.evaluate.ship.control import ship_control
from mmsynth.evaluate.ship.curve import condition_curve, control_run
from mmsynth.evaluate.ship.inpainting import ship_inpainting
from mmsynth.evaluate.ship.t2i import ship_t2i

__all__ = ["Bench", "condition_curve", "control_run", "ship_clip", "ship_control", "ship_inpainting", "ship_t2i"]
