"""Splitting benchmark generation across processes (accelerate) and merging it back in case order.

Every case carries its own seed and is generated alone (n = 1), so an image does not depend on which process
made it or what else was in its batch: merging the shards by case position gives exactly the single-process
result. Only generation is split; scoring runs once, on the main process, over the merged images.
Launch: `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no -m mmsynth.cli.main bench run ...` (on CPU too: see STACK.md; `--cpu` starts one process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """The (position, item) pairs process `rank` of `world` handles: every world-th item, starting at rank."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return [(i, items[i]) for i in range(rank, len(items), world)]


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
    """This process's place in a launch (rank 0 of 1 without one) and how to gather results to every rank."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> Distributed:
        """Join a launch when WORLD_SIZE > 1; on CPU with Accelerator(cpu=True), and check the world size we got
        (a plain Accelerator() on CPU makes every process think it is alone: duplicated work, no error)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from accelerate import Accelerator

        acc = Accelerator(cpu=device == "cpu")
        if acc.num_processes != world:
            raise RuntimeError(f"launched with WORLD_SIZE={world} but accelerate sees {acc.num_processes} process(es); "
                               "on CPU launch with --multi_gpu --num_processes N (see STACK.md)")  # fmt: skip
        return cls(acc.process_index, acc.num_processes, acc)

    @property
    def device(self) -> str | None:
        return None if self.accelerator is None else str(self.accelerator.device)

    def gather(self, part: list[T]) -> list[list[T]]:
        """Every rank's `part`, in rank order (to every rank)."""
        if self.world == 1:
            return [part]
        from accelerate.utils import gather_object

        return [list(p) for p in gather_object([part])]
