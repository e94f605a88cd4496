"""GLIGEN (Li et al. 2023) as a control of the one sampler: named boxes as grounding tokens read by gated
self-attention layers added to every transformer block of a frozen UNet.

The network is a diffusers `UNet2DConditionModel` built with `attention_type="gated"`: its
`GLIGENTextBoundingboxProjection` turns each box's Fourier embedding, concatenated with its phrase's pooled text
embedding, into one grounding token (padded to 30 slots with a learned null), and each `GatedSelfAttentionDense`
adds `tanh(gamma) * SelfAttn([visual, grounding])` to the visual tokens. The control passes boxes, phrase
embeddings and slot masks through `cross_attention_kwargs["gligen"]` exactly as diffusers'
`StableDiffusionGLIGENPipeline` does (the tests check it to float32 tolerance): phrases encoded together with the
tokenizer's padding, the text encoder's `pooler_output`; the unconditional branch gets the masks at 0 (every slot
the learned null). Scheduled sampling is `schedule.end` (default 0.3, the pipeline's
`gligen_scheduled_sampling_beta`): on later steps the control gives nothing and the gated layers are skipped, so the
UNet is the frozen base again (the pipeline's `enable_fuser(False)`).

The zoo ships the gated layers as a bundle component (`gligen`, the layers over its frozen `unet`, see
models/components.py); a bundle whose own UNet is a GLIGEN one (a user's GLIGEN checkpoint) is `model: "unet"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mmsynth.errors import InputError
from mmsynth.models.denoiser import ModelInputs
from mmsynth.sample.controls import Branch, Control, Schedule, Step, register_control
from mmsynth.sample.layout import MAX_BOXES, LayoutOptions, check_layout_option, image_layouts

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

GUIDANCE_METHODS = ("layout-guidance (generate --layout-method backward), layout-attention (forward) or "
                    "regional-prompt (regional)")


def gligen_network(bundle: Any, model: str) -> Any:
    """The bundle's GLIGEN UNet named `model`; InputError naming the guidance methods when there is none."""
    extras = getattr(bundle, "extras", {})
    net = bundle.unet if model == "unet" else extras.get(model)
    if net is None:
        names = ", ".join(sorted(extras)) or "none"
        raise InputError(f"gligen: model '{model}' is not a component of this model (its components: {names}); "
                         f"a model without grounding layers can still follow boxes with {GUIDANCE_METHODS}")
    if getattr(net, "position_net", None) is None or getattr(net.config, "attention_type", None) != "gated":
        raise InputError(f"gligen: '{model}' has no grounding layers (a UNet built with attention_type 'gated'); "
                         f"without them, use {GUIDANCE_METHODS}")
    return net


@register_control
@dataclass(kw_only=True)
class Gligen(LayoutOptions, Control):
    """boxes: [[x0, y0, x1, y1], ...] (fractions of the image) with one phrase each (any text: the phrase's pooled
    embedding is the token, it need not be in the prompt), or one list of each per image; model: the bundle's GLIGEN
    component ("gligen") or "unet" when the model's own UNet has the grounding layers. schedule.end is scheduled
    sampling's beta (grounding on the first 30% of the steps by default; 1.0 grounds every step)."""

    name: ClassVar[str] = "gligen"

    boxes: Any = None
    phrases: Any = None
    model: str = "gligen"
    schedule: Schedule = field(default_factory=lambda: Schedule(end=0.3))

    def __post_init__(self) -> None:
        check_layout_option(self.boxes, self.phrases, "gligen")
        if not isinstance(self.model, str) or not self.model:
            raise InputError(f"gligen: model must be a component name (e.g. gligen) or 'unet', got {self.model!r}")


    def unet_name(self, bundle: Any) -> str | None:
        gligen_network(bundle, self.model)
        return None if self.model == "unet" else self.model

    def prepare(self, ctx: Context) -> None:
        n = ctx.request.n
        dim = int(ctx.network.config.cross_attention_dim)
        layouts = image_layouts(self.boxes, self.phrases, n, "gligen")
        boxes = torch.zeros(n, MAX_BOXES, 4)
        embeddings = torch.zeros(n, MAX_BOXES, dim)
        masks = torch.zeros(n, MAX_BOXES)
        for i, (b, p) in enumerate(layouts):
            k = len(b)
            boxes[i, :k] = torch.tensor(b, dtype=torch.float32)
            embeddings[i, :k] = phrase_embeddings(getattr(ctx.bundle, "tokenizer", None),
                                                  getattr(ctx.bundle, "text_encoder", None), list(p)).float().cpu()
            masks[i, :k] = 1
        for m in ctx.network.modules():  # as the pipeline's enable_fuser(True): its runs leave them switched off
            if type(m).__name__ == "GatedSelfAttentionDense":
                m.enabled = True
        self._gligen = {"boxes": boxes.to(ctx.device, ctx.dtype), "positive_embeddings": embeddings.to(ctx.device,
                        ctx.dtype), "masks": masks.to(ctx.device, ctx.dtype)}  # fmt: skip

    def inputs(self, ctx: Context, step: Step, branch: Branch, latents: torch.Tensor) -> ModelInputs | None:
        g = self._gligen
        if branch.name == "uncond":  # the pipeline's masks[: batch // 2] = 0: every slot the learned null
            g = {**g, "masks": torch.zeros_like(g["masks"])}
        return ModelInputs(cross_attention_kwargs={"gligen": g})

    def close(self, ctx: Context) -> None:
        self.__dict__.pop("_gligen", None)


def phrase_embeddings(tokenizer: Any, text_encoder: Any, phrases: list[str]) -> torch.Tensor:
    """The phrases' pooled text embeddings (len x dim), encoded together as diffusers' GLIGEN pipeline does (the
    control, the training recipe and the probe all embed phrases here)."""
    if tokenizer is None or text_encoder is None:
        raise InputError("gligen: this model has no text encoder to embed the phrases")
    device = next(text_encoder.parameters()).device
    ids = tokenizer(phrases, padding=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(input_ids=ids.input_ids.to(device),
                            attention_mask=ids.attention_mask.to(device)).pooler_output  # fmt: skip
