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
from mmsynth.sample.guides import GUIDES, build_guide, guide_names
from mmsynth.sample.img2img import Img2Img
from mmsynth.sample.inpaint import BlendedInpaint
from mmsynth.sample.inversion import (
    DDIMInversion,
    InitialLatents,
    InvertedLatents,
    SourceAttention,
    edit_request,
    invert,
    load_latents,
    reconstruct,
    save_latents,
)
from mmsynth.sample.request import GenerationRequest
from mmsynth.sample.sampler import Context, SampleResult, sample
from mmsynth.sample.schedulers import SCHEDULERS, make_scheduler, scheduler_names
from mmsynth.sample.universal import UniversalGuidance

__all__ = [
    "CONTROLS",
    "GUIDES",
    "SCHEDULERS",
    "BlendedInpaint",
    "Branch",
    "Context",
    "Control",
    "DDIMInversion",
    "GenerationRequest",
    "Img2Img",
    "InitialLatents",
    "InvertedLatents",
    "ModelInputs",
    "SampleResult",
    "Schedule",
    "SourceAttention",
    "Step",
    "UniversalGuidance",
    "build_guide",
    "control_from_dict",
    "control_names",
    "edit_request",
    "guide_names",
    "invert",
    "load_latents",
    "make_scheduler",
    "reconstruct",
    "register_control",
    "sample",
    "save_latents",
    "scheduler_names",
]
