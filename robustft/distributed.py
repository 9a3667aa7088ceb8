"""The few collectives robustft needs, on top of torch.distributed (a no-op when not initialised)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "barrier", "is_main_process", "rank", "world_size"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` over ranks (in place, returned); used for global norms of sharded tensors."""
    if _active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
