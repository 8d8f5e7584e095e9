"""The few places where the training loop depends on how many processes run it.

Single-process today; the distributed issue fills these in for DDP / FSDP2 (torchrun)
without touching the loop: rank-0-only output, the per-rank slice of the data, and
gradient synchronisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Only rank 0 prints, logs and writes files."""
    return rank() == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share of a list of batches (all of it in a single process)."""
    if world_size() == 1:
        return items
    return items[rank() :: world_size()]
