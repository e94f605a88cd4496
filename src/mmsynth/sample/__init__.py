"""The one sampler: a single loop over a diffusers scheduler that every control plugs into."""

from mmsynth.sample.controls import (
    CONTROLS,
    Branch,
    Control,
    ModelInputs,
    Schedule,
    Step,
    control_from_dict,
    control_names,
    register_control,
)
from mmsynth.sample.img2img import Img2Img
from mmsynth.sample.request import GenerationRequest
from mmsynth.sample.sampler import Context, SampleResult, sample
from mmsynth.sample.schedulers import SCHEDULERS, make_scheduler, scheduler_names

__all__ = [
    "CONTROLS",
    "SCHEDULERS",
    "Branch",
    "Context",
    "Control",
    "GenerationRequest",
    "Img2Img",
    "ModelInputs",
    "SampleResult",
    "Schedule",
    "Step",
    "control_from_dict",
    "control_names",
    "make_scheduler",
    "register_control",
    "sample",
    "scheduler_names",
]
