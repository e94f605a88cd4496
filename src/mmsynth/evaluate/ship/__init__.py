"""Shipping the Shapes zoo (`mmsynth zoo ship t2i|clip|inpainting|control|gligen`): each part is copied into a temporary
copy of the bundle, measured there by the bench commands its card quotes, carded, and renamed into place only if it
is accepted; `mmsynth zoo curve` measures a control run's snapshots (curve.py).

It sits in evaluate because shipping is measuring: it assembles model parts (models), reads training runs (train) and
runs the bench; the CLI hands it the bench's entry point (`Bench`) so that it never imports the CLI.
"""

from mmsynth.lazy import lazy_exports

_EXPORTS = {
    "Bench": "mmsynth.evaluate.ship.common",
    "condition_curve": "mmsynth.evaluate.ship.curve",
    "control_run": "mmsynth.evaluate.ship.curve",
    "ship_clip": "mmsynth.evaluate.ship.clip",
    "ship_control": "mmsynth.evaluate.ship.control",
    "ship_gligen": "mmsynth.evaluate.ship.gligen",
    "ship_inpainting": "mmsynth.evaluate.ship.inpainting",
    "ship_t2i": "mmsynth.evaluate.ship.t2i",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)  # `--help` reads curve.py's defaults without importing torch
__all__ = sorted(_EXPORTS)
