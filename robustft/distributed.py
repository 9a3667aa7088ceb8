"""The few collectives robustft needs, on top of torch.distributed (a no-op when not initialised)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "full_state_dict",
    "is_main_process",
    "rank",
    "reshard",
    "world_size",
]


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


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (in place, returned); used for per-rank metrics such as a batch's loss."""
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value.div_(dist.get_world_size())
    return value


def reshard(model: nn.Module | None) -> None:
    """Free the gathered full parameters FSDP2 may still hold, so the next forward re-gathers the shards.

    FSDP2 keeps the root module's parameters unsharded after a forward without backward (evaluation).
    A callback that then writes into the sharded parameters (EMA weights swapped in, a perturbation, θ(α))
    would not be seen by that stale full copy; resharding after every such write keeps the two in step.
    A no-op for models without FSDP2 modules.
    """
    if model is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2 model as CPU tensors on the main process (empty elsewhere).

    A collective: every rank must call it. The same gather accelerate's ``get_state_dict`` runs for FSDP2
    (``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with a full, CPU-offloaded dict).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
