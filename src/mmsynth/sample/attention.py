"""One attention service per run: every attention patch on a network goes through it, and it alone undoes them.

Controls that read or change attention (Attend-and-Excite, layout attention, the prompt-to-prompt and self-attention
replays of editing) and training's grounding loss do not patch the UNet themselves. They register, as data, what
they need while they prepare: score taps (a function that sees, and may replace, one cross-attention layer's
probabilities), forward hooks on named modules, and per-call data that rides in the UNet call's
`cross_attention_kwargs`. The loop applies everything once after every control has prepared, and removes it
last-in-first-out when the run ends, so two attention controls never stack patches on each other and the network
leaves a run with exactly the processors it came in with (ComfyUI's model patcher is the example).

While taps are registered, the cross-attention layers run diffusers' classic `AttnProcessor` (which materialises
the probabilities) with `get_attention_scores` wrapped once per layer to run the taps in registration order; all
other layers keep their processors. Taps learn which guidance branch each chunk of the batch belongs to from
`branches` (the loop sets it before every model call) and where each control's tokens sit from the run's
`Context.token_slices`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

ScoreTap = Callable[[str, torch.Tensor], torch.Tensor]  # (layer name, probabilities B*heads x HW x T) -> probabilities
CALL_DATA_PREFIX = "mmsynth:"  # cross_attention_kwargs entries the service takes out before diffusers sees them


def attention_modules(network: torch.nn.Module, which: str = "attn1") -> dict[str, torch.nn.Module]:
    """The network's self- ("attn1") or cross-attention ("attn2") modules, as diffusers names them in every
    transformer block."""
    return {name: m for name, m in network.named_modules() if name.endswith(which) and hasattr(m, "to_q")}


def call_data_key(owner: str) -> str:
    """The cross_attention_kwargs key of `owner`'s per-call data (see `AttentionService.call_data`)."""
    return CALL_DATA_PREFIX + owner


class AttentionService:
    """Registered taps and hooks, applied together and undone last-in-first-out (see the module docstring)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self.branches: list[str] = []  # the guidance branch of each chunk of the current call's batch
        self.call_data: dict[str, Any] = {}  # owner -> its data in the current call (batched like the call)
        self._taps: list[ScoreTap] = []
        self._hooks: list[tuple[torch.nn.Module, Callable[..., Any]]] = []
        self._undo: list[Callable[[], None]] = []

    # ---- registration (while controls prepare)
    def add_score_tap(self, tap: ScoreTap) -> None:
        """`tap(layer, probs)` runs on every cross-attention layer's probabilities and returns what the layer uses."""
        self._check_open()
        self._taps.append(tap)

    def add_forward_hook(self, module: torch.nn.Module, hook: Callable[..., Any]) -> None:
        """A forward hook (`hook(module, args, output)`) on one of the network's modules."""
        self._check_open()
        self._hooks.append((module, hook))

    def _check_open(self) -> None:
        if self._undo:
            raise RuntimeError("the attention service is applied; register taps and hooks before the run starts")

    @property
    def active(self) -> bool:
        return bool(self._undo)

    # ---- the loop's side
    def apply(self) -> None:
        """Install everything registered (once); a service with nothing registered leaves the network untouched."""
        if self._undo or not (self._taps or self._hooks):
            return
        try:
            self._undo.append(self.network.register_forward_pre_hook(self._take_call_data, with_kwargs=True).remove)
            if self._taps:
                self._install_taps()
            for module, hook in self._hooks:
                self._undo.append(module.register_forward_hook(hook).remove)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo every patch, last first; the network has its original processors and no hooks afterwards."""
        while self._undo:
            self._undo.pop()()
        self.call_data = {}

    @contextmanager
    def applied(self) -> Iterator[AttentionService]:
        self.apply()
        try:
            yield self
        finally:
            self.remove()

    def _install_taps(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor

        modules = attention_modules(self.network, "attn2")
        processors = dict(self.network.attn_processors)
        self.network.set_attn_processor({key: AttnProcessor() if key.removesuffix(".processor") in modules else proc
                                         for key, proc in processors.items()})  # fmt: skip
        self._undo.append(lambda: self.network.set_attn_processor(processors))
        for name, module in modules.items():
            original = module.__dict__.get("get_attention_scores")
            module.get_attention_scores = self._tapped(name, module.get_attention_scores)
            self._undo.append(lambda m=module, o=original: _restore_scores(m, o))

    def _tapped(self, layer: str, scores: Any) -> Any:
        def tapped(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            probs = scores(query, key, attention_mask)
            for tap in self._taps:
                probs = tap(layer, probs)
            return probs

        return tapped

    def _take_call_data(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cak = kwargs.get("cross_attention_kwargs")
        self.call_data = {}
        if isinstance(cak, dict) and any(k.startswith(CALL_DATA_PREFIX) for k in cak):
            self.call_data = {k[len(CALL_DATA_PREFIX):]: v for k, v in cak.items() if k.startswith(CALL_DATA_PREFIX)}
            rest = {k: v for k, v in cak.items() if not k.startswith(CALL_DATA_PREFIX)}
            kwargs = {**kwargs, "cross_attention_kwargs": rest or None}
        return args, kwargs

    # ---- helpers for taps
    def chunks(self, probs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The probabilities split by guidance branch (the batch holds the branches' images one after another)."""
        if not self.branches:
            return [("", probs)]
        return list(zip(self.branches, probs.chunk(len(self.branches))))


def _restore_scores(module: torch.nn.Module, original: Any) -> None:
    if original is None:
        module.__dict__.pop("get_attention_scores", None)
    else:
        module.get_attention_scores = original


class AttentionRecorder:
    """Keeps the cross-attention probabilities (with their graph) of the calls made inside `with recorder.record()`.

    One recorder serves guidance (Attend-and-Excite reads one resolution's maps) and training (the grounding loss
    reads every layer's): `cells` limits it to layers with that many query positions.
    """

    def __init__(self, service: AttentionService, cells: int | None = None) -> None:
        self.maps: list[torch.Tensor] | None = None  # a list while recording
        self.cells = cells
        service.add_score_tap(self._tap)

    def _tap(self, layer: str, probs: torch.Tensor) -> torch.Tensor:
        if self.maps is not None and (self.cells is None or probs.shape[1] == self.cells):
            self.maps.append(probs)
        return probs

    @contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        """The list the calls inside the block fill with attention probabilities, in call order."""
        self.maps = maps = []
        try:
            yield maps
        finally:
            self.maps = None
