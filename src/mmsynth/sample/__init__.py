"""The one sampler: a single loop over a diffusers scheduler that every control plugs into.

Names are imported lazily (PEP 562), so `mmsynth --help` and light users do not load diffusers.
"""

from mmsynth.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AttendExcite": "mmsynth.sample.attend_excite",
    "BlendedInpaint": "mmsynth.sample.inpaint",
    "Branch": "mmsynth.sample.controls",
    "CONTROLS": "mmsynth.sample.controls",
    "Composer": "mmsynth.sample.composer",
    "Context": "mmsynth.sample.sampler",
    "ControlNet": "mmsynth.sample.controlnet",
    "Control": "mmsynth.sample.controls",
    "AttentionService": "mmsynth.sample.attention",
    "DDIMInversion": "mmsynth.sample.inversion",
    "GUIDES": "mmsynth.sample.guides",
    "GenerationRequest": "mmsynth.sample.request",
    "Denoiser": "mmsynth.models.denoiser",
    "Img2Img": "mmsynth.sample.img2img",
    "InitialLatents": "mmsynth.sample.inversion",
    "InvertedLatents": "mmsynth.sample.inversion",
    "Gligen": "mmsynth.sample.gligen",
    "Layout": "mmsynth.sample.layout",
    "LayoutAttention": "mmsynth.sample.layout_attention",
    "LayoutGuidance": "mmsynth.sample.layout_guidance",
    "RegionalPrompt": "mmsynth.sample.regional_prompts",
    "ModelInputs": "mmsynth.models.denoiser",
    "NullTextInversion": "mmsynth.sample.null_text",
    "PaintByExample": "mmsynth.sample.paint_by_example",
    "SCHEDULERS": "mmsynth.sample.schedulers",
    "SampleResult": "mmsynth.sample.sampler",
    "Schedule": "mmsynth.sample.controls",
    "SourceAttention": "mmsynth.sample.attention_replay",
    "SourceCrossAttention": "mmsynth.sample.attention_replay",
    "Step": "mmsynth.sample.controls",
    "T2IAdapterControl": "mmsynth.sample.t2i_adapter",
    "UniversalGuidance": "mmsynth.sample.universal",
    "build_guide": "mmsynth.sample.guides",
    "control_from_dict": "mmsynth.sample.controls",
    "control_names": "mmsynth.sample.controls",
    "edit_request": "mmsynth.sample.edit",
    "guide_names": "mmsynth.sample.guides",
    "invert": "mmsynth.sample.inversion",
    "load_latents": "mmsynth.sample.latents_file",
    "make_scheduler": "mmsynth.sample.schedulers",
    "reconstruct": "mmsynth.sample.inversion",
    "register_control": "mmsynth.sample.controls",
    "sample": "mmsynth.sample.sampler",
    "save_latents": "mmsynth.sample.latents_file",
    "scheduler_names": "mmsynth.sample.schedulers",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
