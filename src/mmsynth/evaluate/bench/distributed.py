"""Splitting benchmark generation across processes (accelerate) and merging it back in case order.

The launch, the world-size check, the gathering and the merge are sample/distributed.py's (`Distributed`, shared
with `mmsynth generate --prompt-file`); `shard` is the pure split the runner calls with an explicit rank and world.
Every case carries its own seed and is generated alone (n = 1), so an image does not depend on which process
made it or what else was in its batch: merging the shards by case position gives exactly the single-process
result. Only generation is split; scoring runs once, on the main process, over the merged images.
Launch: `accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
--dynamo_backend no -m mmsynth.cli.main bench run ...` (CPU processes: add `--device cpu`; `--cpu` starts one
process; several machines: docs/multi-gpu.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from mmsynth.sample.distributed import Distributed, chunk, merge_shards

T = TypeVar("T")
__all__ = ["Distributed", "chunk", "merge_shards", "shard"]


def shard(items: Sequence[T], rank: int, world: int) -> list[tuple[int, T]]:
    """The (position, item) pairs process `rank` of `world` handles: its contiguous chunk, as
    `PartialState.split_between_processes` cuts it (`chunk`)."""
    return [(i, items[i]) for i in chunk(len(items), rank, world)]
