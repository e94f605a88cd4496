"""A fast text-to-image (+ ControlNet) denoising loop for a GPU, equal to diffusers' pipelines up to rounding.

diffusers' `StableDiffusion(ControlNet)Pipeline` spends much of a small-batch step outside the networks: python
branching, a scheduler whose `step` keeps python-side state (a step counter, UniPC's list of past model outputs),
and hundreds of kernel launches per UNet call. `FastSampler` removes that overhead without changing the maths:

- one ControlNet + UNet call per step on the fused batch of 2B (unconditional first, as diffusers orders it);
- the scheduler as tables (`LinearSchedule`): a deterministic diffusers scheduler (UniPC, DDIM with eta = 0,
  DPM-Solver++, ...) maps the initial latents and the model outputs of the steps so far *linearly* to the next
  latents, so its whole run is a per-step row of coefficients. The rows are read off diffusers' own `step` (run
  once on unit inputs), not re-derived, and checked against it on random inputs; a scheduler that is not linear
  (thresholding, `clip_sample`, eta > 0) is refused. A step then is a few tensor ops indexed by a step counter
  that lives on the device: no host syncs, no python branching on tensor values, static shapes;
- on CUDA, by default: the modules in channels_last, SDPA attention (diffusers' `AttnProcessor2_0`), and one
  whole denoising step (ControlNet + UNet + CFG combine + scheduler update + counter increment) captured once in a
  `torch.cuda.CUDAGraph` (static input/output buffers, warmed up on a side stream) and replayed per step. Optionally
  (`compile_mode`) the ControlNet, UNet and VAE decoder are `torch.compile`d first (inside the graph: use a mode
  without inductor's own CUDA graphs, e.g. "max-autotune-no-cudagraphs").

On a CPU it runs the same step eagerly (no graph, no compile, default memory format), which is what the tests
compare with diffusers' pipelines. The latents and the scheduler arithmetic stay in float32 whatever the networks'
dtype (diffusers keeps fp16 latents), so fp16 results differ from the pipeline's by fp16 rounding only.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

LINEARITY_TOLERANCE = 1e-5  # relative; float32 rounding is ~1e-7, a clipped or thresholded step ~1
GRAPH_WARMUP_STEPS = 2  # untimed steps on a side stream before capture (cuDNN autotuning, lazy inits, compiling)


# ---------------------------------------------------------------------------------------------- the scheduler
@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """A deterministic diffusers scheduler's whole run of `steps` as coefficient tables.

    With x_0 the initial latents (noise times `init_noise_sigma`) and e_j the (CFG-combined) model output of step
    j, the pipeline feeds the networks `input_scale[i] * x_i` at timestep `timesteps[i]` and the scheduler returns
    x_{i+1} = start_coef[i] * x_0 + sum_j output_coef[i, j] * e_j (output_coef[i, j] = 0 for j > i).
    """

    timesteps: torch.Tensor  # (N,) as the scheduler hands them to the networks
    input_scale: torch.Tensor  # (N,) float32: `scale_model_input`'s factor
    start_coef: torch.Tensor  # (N,) float32
    output_coef: torch.Tensor  # (N, N) float32, lower triangular
    init_noise_sigma: float

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler(cls, scheduler: Any, steps: int, check: bool = True) -> LinearSchedule:
        """Tabulate `steps` steps of (a fresh copy of) `scheduler`, probing its own `step` with unit inputs in
        float64; `check` runs it again on random inputs and raises ValueError if the tables do not reproduce it
        (a scheduler that is not a linear map of its inputs)."""
        sch = _fresh(scheduler, steps)
        timesteps = sch.timesteps.clone()
        n = len(timesteps)
        x = torch.zeros(n + 1, 1, 1, 1, dtype=torch.float64)  # probe 0: x_0 = 1; probe j + 1: e_j = 1
        x[0] = 1
        scale, start, outputs = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), []
        for i, t in enumerate(timesteps):
            scaled = sch.scale_model_input(torch.cat([x, torch.ones_like(x[:1])]), t)
            scale[i] = scaled[-1].flatten()[0]
            e = torch.zeros_like(x)
            e[i + 1] = 1
            x = sch.step(e, t, x, return_dict=False)[0]
            start[i] = x[0].flatten()[0]
            outputs.append(x[1:].flatten())
        table = cls(timesteps=timesteps, input_scale=scale.float(), start_coef=start.float(),
                    output_coef=torch.stack(outputs).float(), init_noise_sigma=float(sch.init_noise_sigma))  # fmt: skip
        if check:
            table._check(scheduler, torch.stack(outputs), start, scale)
        return table

    def to(self, device: torch.device | str) -> LinearSchedule:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})  # fmt: skip

    def _check(self, scheduler: Any, out_coef: torch.Tensor, start: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise ValueError unless the float64 tables reproduce the scheduler on random inputs (to float32
        rounding: some schedulers compute in float32 whatever the input dtype) with finite latents."""
        sch = _fresh(scheduler, self.steps)
        gen = torch.Generator().manual_seed(0)
        x0 = 3 * torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64)  # large enough to trip clipping
        es, x, worst = [], x0, 0.0
        for i, t in enumerate(self.timesteps):
            worst = max(worst, _relative(sch.scale_model_input(x, t), scale[i] * x))
            es.append(3 * torch.randn(x0.shape, generator=gen, dtype=torch.float64))
            x = sch.step(es[-1], t, x, return_dict=False)[0]
            if not torch.isfinite(x).all():
                raise ValueError(f"{type(scheduler).__name__} with this configuration gives non-finite latents at "
                                 f"step {i} of {self.steps} (diffusers' own step, on random inputs)")  # fmt: skip
            mine = start[i] * x0 + torch.tensordot(out_coef[i, : i + 1], torch.stack(es), dims=1)
            worst = max(worst, _relative(x, mine))
        if not worst <= LINEARITY_TOLERANCE:
            raise ValueError(f"{type(scheduler).__name__} with this configuration is not a linear map of the latents "
                             f"and model outputs (relative error {worst:.2g} on random inputs; thresholding, "
                             f"clip_sample or eta > 0?): the fast path cannot tabulate it")  # fmt: skip


def _fresh(scheduler: Any, steps: int) -> Any:
    sch = type(scheduler).from_config(scheduler.config)
    sch.set_timesteps(steps)
    return sch


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (1 + b.abs().max()))


# ---------------------------------------------------------------------------------------------- text
@torch.inference_mode()
def encode_prompt(tokenizer: Any, text_encoder: Any, prompt: str, batch: int,
                  negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, negative prompt embeddings), each repeated to `batch` rows, as the Stable Diffusion
    pipelines encode them (padded to the tokenizer's max length, last hidden state, text encoder dtype)."""
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)

    def encode(text: str) -> torch.Tensor:
        tokens = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        mask = tokens.attention_mask.to(device) if use_mask else None
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(dtype=text_encoder.dtype).repeat(batch, 1, 1)

    return encode(prompt), encode(negative_prompt)


# ---------------------------------------------------------------------------------------------- the sampler
@dataclasses.dataclass
class _Buffers:
    """Static buffers of one input shape: what a captured step reads and writes."""

    start: torch.Tensor  # x_0, float32
    latents: torch.Tensor  # x_i, float32
    outputs: torch.Tensor  # (N, B, ...) the CFG-combined model outputs so far, float32
    embeddings: torch.Tensor  # (2B or B, L, D): negative rows first
    control: torch.Tensor | None  # (2B or B, 3, H, W) in [0, 1]
    step: torch.Tensor  # (1,) int64
    graph: Any = None  # torch.cuda.CUDAGraph once captured

    def reset(self) -> None:
        self.step.zero_()
        self.outputs.zero_()  # (0 * stale is 0 only for finite stale values)
        self.latents.copy_(self.start)


class FastSampler:
    """Text-to-image sampling with an optional ControlNet, the loop of `StableDiffusionControlNetPipeline`
    without its per-step overhead (see the module docstring). Construct once, call per batch.

    The modules are prepared in place: channels_last (on CUDA by default) and, with `sdpa`, diffusers' SDPA
    attention processor on the UNet and ControlNet (replacing any custom processor). Neither changes their outputs
    beyond rounding. One CUDA graph (with its memory pool) is kept per input shape; `release` drops them.
    """

    def __init__(self, unet: Any, vae: Any, scheduler: Any, *, controlnet: Any = None, steps: int = 20,
                 guidance_scale: float = 7.5, conditioning_scale: float = 1.0, cuda_graph: bool | None = None,
                 channels_last: bool | None = None, sdpa: bool = True, compile_mode: str | None = None) -> None:
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        on_cuda = self.device.type == "cuda"
        self.unet, self.vae, self.controlnet = unet, vae, controlnet
        self.schedule = LinearSchedule.from_scheduler(scheduler, steps).to(self.device)
        self.guidance_scale, self.conditioning_scale = float(guidance_scale), float(conditioning_scale)
        # as diffusers: CFG (a doubled batch) only above 1 and not for guidance-distilled UNets
        self.cfg = guidance_scale > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None
        self.cuda_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and not on_cuda:
            raise ValueError("cuda_graph needs the modules on a CUDA device")
        self.channels_last = on_cuda if channels_last is None else bool(channels_last)
        nets = [m for m in (unet, controlnet) if m is not None]
        if sdpa:
            from diffusers.models.attention_processor import AttnProcessor2_0

            for net in nets:
                if any(not isinstance(p, AttnProcessor2_0) for p in net.attn_processors.values()):
                    net.set_attn_processor(AttnProcessor2_0())
        if self.channels_last:
            for m in (*nets, vae):
                m.to(memory_format=torch.channels_last)
        self._unet, self._controlnet, self._decode = unet, controlnet, vae.decode
        if compile_mode is not None:
            self._unet = torch.compile(unet, mode=compile_mode, dynamic=False)
            self._controlnet = None if controlnet is None else torch.compile(controlnet, mode=compile_mode,
                                                                             dynamic=False)  # fmt: skip
            self._decode = torch.compile(vae.decode, mode=compile_mode, dynamic=False)
        self._buffers: dict[tuple, _Buffers] = {}
        self.graph_error: str | None = None  # why capture failed (the loop then runs eagerly)

    @torch.inference_mode()
    def __call__(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, noise: torch.Tensor,
                 control_image: torch.Tensor | None = None, *, decode: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], float32, on the device (or the final latents, `decode=False`) from
        `noise` (B, C, h, w) and the embeddings (B, L, D); `control_image` (1 or B, 3, H, W) in [0, 1] is the
        ControlNet's condition."""
        if (control_image is None) != (self.controlnet is None):
            raise ValueError("a control image goes with a ControlNet, and only with one")
        buf = self._buffers_for(prompt_embeds, noise, control_image)
        n = len(noise)
        emb = torch.cat([negative_prompt_embeds, prompt_embeds]) if self.cfg else prompt_embeds
        buf.embeddings.copy_(emb)
        if buf.control is not None:
            control = control_image.repeat_interleave(n // len(control_image), dim=0)
            buf.control.copy_(torch.cat([control, control]) if self.cfg else control)
        buf.start.copy_(noise).mul_(self.schedule.init_noise_sigma)
        if self.cuda_graph and buf.graph is None and self.graph_error is None:
            self._capture(buf)
        buf.reset()
        for _ in range(self.schedule.steps):
            if buf.graph is not None:
                buf.graph.replay()
            else:
                self._step(buf)
        return self.decode(buf.latents) if decode else buf.latents.clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (float32), as the pipelines' VAE decode and post-processing."""
        z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        images = self._decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def release(self) -> None:
        """Drop the static buffers and CUDA graphs (their memory pools) of every input shape seen."""
        self._buffers.clear()

    # ------------------------------------------------------------------------------------------ internals
    def _buffers_for(self, embeds: torch.Tensor, noise: torch.Tensor, control: torch.Tensor | None) -> _Buffers:
        key = (tuple(embeds.shape), tuple(noise.shape), None if control is None else tuple(control.shape[1:]))
        if key not in self._buffers:
            rows = 2 * len(noise) if self.cfg else len(noise)
            f32 = dict(device=self.device, dtype=torch.float32)
            self._buffers[key] = _Buffers(
                start=torch.zeros(noise.shape, **f32), latents=torch.zeros(noise.shape, **f32),
                outputs=torch.zeros((self.schedule.steps, *noise.shape), **f32),
                embeddings=torch.zeros((rows, *embeds.shape[1:]), device=self.device, dtype=self.dtype),
                control=None if control is None else self._layout(
                    torch.zeros((rows, *control.shape[1:]), device=self.device, dtype=self.dtype)),
                step=torch.zeros(1, device=self.device, dtype=torch.long),
            )  # fmt: skip
        return self._buffers[key]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _step(self, buf: _Buffers) -> None:
        """One denoising step on the static buffers, as device tensor ops only (what the CUDA graph captures)."""
        s, i = self.schedule, buf.step
        t = s.timesteps.index_select(0, i)
        x = (buf.latents * s.input_scale.index_select(0, i)).to(self.dtype)
        x = self._layout(torch.cat([x, x]) if self.cfg else x)
        residuals: dict[str, Any] = {}
        if self._controlnet is not None:
            down, mid = self._controlnet(x, t, encoder_hidden_states=buf.embeddings, controlnet_cond=buf.control,
                                         conditioning_scale=self.conditioning_scale, return_dict=False)  # fmt: skip
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out = self._unet(x, t, encoder_hidden_states=buf.embeddings, return_dict=False, **residuals)[0].float()
        if self.cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        buf.outputs.index_copy_(0, i, out.unsqueeze(0))
        row = s.output_coef.index_select(0, i)[0]
        buf.latents.copy_(buf.start * s.start_coef.index_select(0, i) + torch.tensordot(row, buf.outputs, dims=1))
        buf.step.add_(1)

    def _capture(self, buf: _Buffers) -> None:
        """Capture one step in a CUDA graph (after warm-up steps on a side stream); on failure, keep the reason
        in `graph_error` and run eagerly from then on."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                buf.reset()
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._step(buf)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(buf)
            buf.graph = graph
        except Exception as e:  # a module that syncs or allocates from the host cannot be captured: run it eagerly
            self.graph_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"FastSampler: CUDA graph capture failed, running eagerly ({self.graph_error})",
                          stacklevel=3)  # fmt: skip
