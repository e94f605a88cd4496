"""Splitting sampling work across the processes of an `accelerate launch` and merging it back in input order.

`Distributed.from_env` joins a launch (GPUs of one machine, several machines, or CPU processes for testing) through
accelerate's `PartialState`; `split` hands this process its share with `PartialState.split_between_processes`
(one contiguous chunk per process, each item with its position); `collect` gathers every process's (position,
result) pairs (`gather_object`) and puts them back in position order. Every work item carries its own seed and is
sampled alone, so a result does not depend on which process made it: the merge equals the one-process run.
Without a launch (WORLD_SIZE unset or 1) nothing is imported and `split` returns every item.
Launch (docs/multi-gpu.md): `accelerate launch --multi_gpu --num_processes N ... -m mmsynth.cli.main COMMAND ...`;
on CPU the same with `--device cpu` (`--cpu` starts one process; see STACK.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def chunk(n: int, rank: int, world: int) -> range:
    """The positions of n items that process `rank` of `world` gets: `split_between_processes`' contiguous chunk
    (the first n % world processes take one item more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def merge_shards(shards: Sequence[Sequence[tuple[int, T]]], n: int) -> list[T]:
    """Put the (position, result) pairs of every shard back in position order; each position exactly once."""
    out: list[Any] = [None] * n
    seen = [False] * n
    for part in shards:
        for i, value in part:
            if not 0 <= i < n or seen[i]:
                raise RuntimeError(f"merge: position {i} is out of range or produced twice (n={n})")
            out[i], seen[i] = value, True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"merge: {len(missing)} position(s) missing, e.g. {missing[:5]}")
    return out


@dataclass
class Distributed:
    """This process's place in a launch (rank 0 of 1 without one), its share of the work, and the gathering."""

    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate's PartialState within a launch

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> Distributed:
        """Join a launch when WORLD_SIZE > 1 (PartialState(cpu=True) for a CPU `device`) and check the world size
        accelerate sees: on CPU a plain PartialState() / Accelerator() makes every process think it is alone
        (duplicated work, no error)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=str(device).startswith("cpu"))
        if state.num_processes != world:
            raise RuntimeError(f"launched with WORLD_SIZE={world} but accelerate sees {state.num_processes} "
                               "process(es); on CPU launch with --multi_gpu --num_processes N and --device cpu "
                               "(see docs/multi-gpu.md)")
        return cls(state.process_index, state.num_processes, state)

    @property
    def device(self) -> str | None:
        """This process's device within a launch (cuda:LOCAL_RANK on GPUs); None without one."""
        return None if self.state is None else str(self.state.device)

    def split(self, items: Sequence[T]) -> list[tuple[int, T]]:
        """This process's (position, item) pairs: `split_between_processes` over the numbered items."""
        numbered = list(enumerate(items))
        if self.state is None:
            return numbered
        with self.state.split_between_processes(numbered) as mine:
            return list(mine)

    def gather(self, part: list[T]) -> list[list[T]]:
        """Every rank's `part`, in rank order (to every rank)."""
        if self.world == 1:
            return [part]
        from accelerate.utils import gather_object

        return [list(p) for p in gather_object([part])]

    def collect(self, part: list[tuple[int, T]], n: int) -> list[T]:
        """Every rank's (position, result) pairs gathered and merged into the n results in position order."""
        return merge_shards(self.gather(part), n)
