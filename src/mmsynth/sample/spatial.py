"""What the spatial controls (ControlNet, T2I-Adapter) share: the condition image, its annotator, the model lookup.

Both take a condition image (an RGB array, an image path or a PNG data URI; or one per image of the batch), may
extract the condition from it on the fly with an annotator of `mmsynth.annotate` (`annotate="canny"`), and name
their network as a bundle component ("controlnet_canny") or a local directory that the network's diffusers class
loads with `from_pretrained`. A label map an annotator makes (segmentation) is colour-coded as training showed it
(`annotate.network_input`); a condition image given directly is taken as it is. The condition is preprocessed
with diffusers' own `VaeImageProcessor` exactly as diffusers' pipelines do (values in [0, 1], not normalised,
resized with Lanczos to the output size), so the same weights give the same result here and there.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mmsynth.errors import InputError
from mmsynth.models.components import move_module
from mmsynth.sample.controls import Control, Schedule, check_batch_length, decode_array, is_number

if TYPE_CHECKING:
    from mmsynth.sample.sampler import Context

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SpatialControl(Control):
    """Base of the controls that read a condition image through their own network (`model_class`).

    model: a bundle component name or a directory `model_class.from_pretrained` loads; image: the condition (HxWx3
    uint8 array, path or PNG data URI, or a list of n, one per image); annotate: an annotator name applied to
    `image` first (None: the image is the condition already), with `annotate_params` (e.g. canny's thresholds).
    """

    model_class: ClassVar[str] = ""  # the diffusers class the model must be (ControlNetModel, T2IAdapter)
    per_image: ClassVar[tuple[str, ...]] = ("image",)

    model: str = ""
    image: Any = None
    annotate: str | None = None
    annotate_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InputError(f"{self.name}: model must be a component name of the model (e.g. controlnet_canny) or "
                             f"a directory {self.model_class}.from_pretrained loads, got {self.model!r}")
        if self.image is None or (isinstance(self.image, list) and not self.image):
            raise InputError(f"{self.name} needs a condition image (an image path or an HxWx3 uint8 array)")
        images = self.image if isinstance(self.image, list) else [self.image]
        for i, im in enumerate(images):
            if isinstance(im, (np.ndarray, torch.Tensor)):
                check_image_array(decode_array(im, self._what(i)), self._what(i))
        if self.annotate is not None:
            from mmsynth.annotate import get_annotator

            get_annotator(self.annotate)  # an unknown name lists the valid ones now, not mid-run
        if not isinstance(self.annotate_params, dict):
            raise InputError(f"{self.name}: annotate_params must be an object of annotator options, got "
                             f"{self.annotate_params!r:.60}")
        check_weights(self.schedule, self.name)

    def _what(self, i: int | None = None) -> str:
        return f"{self.name} image" + ("" if i is None or not isinstance(self.image, list) else f" {i}")

    # ---- the network
    def network(self, ctx: Context) -> torch.nn.Module:
        """The named component of the bundle, or the directory's model (loaded once per path), on the run's device
        and dtype; InputError listing the bundle's components when it is neither."""
        import diffusers

        cls = getattr(diffusers, self.model_class)
        extras = getattr(ctx.bundle, "extras", {})
        if self.model in extras:
            net = extras[self.model]
        elif Path(self.model).is_dir():
            net = _load(cls, str(Path(self.model).resolve()))
        else:
            names = ", ".join(sorted(extras)) or "none"
            raise InputError(f"{self.name}: model '{self.model}' is neither a component of this model (its components:"
                             f" {names}) nor a directory {self.model_class}.from_pretrained loads")
        if not isinstance(net, cls):
            raise InputError(f"{self.name}: model '{self.model}' is a {type(net).__name__}, not a {self.model_class}")
        return move_module(net, ctx.device, ctx.dtype)

    # ---- the condition
    def condition(self, ctx: Context, channels: int) -> torch.Tensor:
        """The condition(s) as 1 or n x channels x H x W in [0, 1] at the output size, preprocessed as diffusers'
        pipelines do (`VaeImageProcessor`, do_normalize=False; Lanczos resize, with a warning naming both sizes)."""
        from diffusers.image_processor import VaeImageProcessor

        if channels not in (1, 3):
            raise InputError(f"{self.name}: model '{self.model}' takes {channels}-channel conditions; mmsynth gives "
                             "1 (grey) or 3 (RGB)")
        check_batch_length(self.image, ctx.request.n, self.name, "images")
        images = self.image if isinstance(self.image, list) else [self.image]
        processor = VaeImageProcessor(vae_scale_factor=ctx.denoiser.scale_factor, do_convert_rgb=False,
                                      do_normalize=False)
        out = []
        for i, raw in enumerate(images):
            what = self._what(i)
            arr = check_image_array(decode_array(raw, what), what)
            if self.annotate is not None:
                from mmsynth.annotate import annotate
                from mmsynth.annotate.network_input import network_input

                arr = check_image_array(network_input(self.annotate, annotate(self.annotate, rgb(arr, what),
                                                                              **self.annotate_params)),
                                        f"{what} after '{self.annotate}'")  # label maps colour-coded
            pil = Image.fromarray(rgb(arr, what) if channels == 3 else grey(arr))
            if pil.size != (ctx.width, ctx.height):
                log.warning("%s is %dx%d; resized to the output's %dx%d", what, *pil.size, ctx.width, ctx.height)
            out.append(processor.preprocess(pil, height=ctx.height, width=ctx.width).to(torch.float32))
        return torch.cat(out).to(ctx.device, ctx.dtype)


@functools.lru_cache(maxsize=8)
def _load(cls: type, path: str) -> torch.nn.Module:
    """A spatial control's network from a directory, loaded once per path (runs in one process share it)."""
    try:
        return cls.from_pretrained(path, torch_dtype=torch.float32).eval()
    except Exception as exc:  # a folder of something else: one clear line
        raise InputError(f"cannot load a {cls.__name__} from '{path}' ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})") from None


def check_image_array(arr: Any, what: str) -> np.ndarray:
    """A condition image must be uint8, HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA, composited over white)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise InputError(f"{what} must be a uint8 image, got dtype {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise InputError(f"{what} must be an HxW, HxWx3 or HxWx4 image, got shape {arr.shape}")
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """HxWx3: grey repeated, alpha composited over white (mmsynth.annotate's rule for any input image)."""
    from mmsynth.annotate.registry import as_rgb

    try:
        return as_rgb(arr)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def grey(arr: np.ndarray) -> np.ndarray:
    """HxW: colour converted with PIL's luma rule (what diffusers would see from `image.convert("L")`)."""
    if arr.ndim == 2:
        return arr
    return np.asarray(Image.fromarray(rgb(arr, "condition")).convert("L"))


def check_weights(schedule: Schedule, owner: str) -> None:
    """A spatial control's weights are >= 0: a negative weight pushes away from the condition, which no reference
    defines (and is almost always a typo)."""
    scales = schedule.scale if isinstance(schedule.scale, list) else [schedule.scale]
    bad = [s for s in scales if not is_number(s) or s < 0]
    if bad:
        raise InputError(f"{owner}: schedule.scale must be >= 0 (one number, or one per residual), got {bad[0]!r}")


def cond_only(schedule: Schedule, owner: str, why: str) -> Schedule:
    """The schedule restricted to the conditional branch (guess mode, "control more important")."""
    if schedule.branch == "uncond":
        raise InputError(f"{owner}: {why} acts on the conditional branch; schedule.branch 'uncond' contradicts it")
    return schedule if schedule.branch == "cond" else replace(schedule, branch="cond")

