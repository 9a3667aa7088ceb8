"""The few collectives robustft needs, on top of torch.distributed (a no-op when not initialised).

DeepSpeed is detected here and only here (:func:`deepspeed_stage`); it is never imported by robustft:
if the ``deepspeed`` module was not imported by the Trainer/accelerate, DeepSpeed is not running.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from robustft.core.compat import release_zero3_gathered, relink_zero_optimizer_states
from robustft.core.params import is_zero3_param, zero3_partition

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_main",
    "deepspeed_engine",
    "deepspeed_optimizer_states",
    "deepspeed_stage",
    "full_state_dict",
    "gathered",
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


def broadcast_from_main(value: torch.Tensor) -> torch.Tensor:
    """Overwrite ``value`` with the main process's (in place, returned): one mask for all ranks."""
    if _active() and dist.get_world_size() > 1:
        dist.broadcast(value, src=0)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (in place, returned); used for per-rank metrics such as a batch's loss."""
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value.div_(dist.get_world_size())
    return value


def reshard(model: nn.Module | None) -> None:
    """Free the gathered full parameters FSDP2 or ZeRO-3 may still hold, so the next forward (or a gather)
    re-gathers the shards.

    FSDP2 keeps the root module's parameters unsharded after a forward without backward (evaluation);
    ZeRO-3 (prefetch/reuse defaults) keeps most parameters gathered after an evaluation and fetches
    only those that are not. A callback that then writes into the shards (EMA weights swapped in, a
    perturbation, θ(α)) would not be seen by that stale full copy; resharding after every such write
    keeps the two in step. A no-op for other models.
    """
    if model is None:
        return
    release_zero3_gathered(next((p for p in model.parameters() if is_zero3_param(p)), None))
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


# -- DeepSpeed ----------------------------------------------------------------------------------------
def _deepspeed():
    return sys.modules.get("deepspeed")


def deepspeed_engine(obj: Any):
    """The ``DeepSpeedEngine`` behind ``obj`` (an engine, or a Trainer's ``model_wrapped``), else None."""
    ds = _deepspeed()
    if ds is None:
        return None
    engine_cls = ds.DeepSpeedEngine
    for candidate in (obj, getattr(obj, "model_wrapped", None), getattr(obj, "deepspeed", None)):
        if isinstance(candidate, engine_cls):
            return candidate
    return None


def deepspeed_stage(obj: Any) -> int | None:
    """ZeRO stage (0-3) DeepSpeed runs with, or None without DeepSpeed.

    ``obj`` is a Trainer, a ``DeepSpeedEngine``, a model, or parameters (a name->tensor mapping or an
    iterable). A model or parameters alone only reveal ZeRO-3 (its parameters carry ``ds_id``);
    ZeRO-1/2 keep plain parameters, so pass the Trainer or the engine to see those stages.
    """
    if _deepspeed() is None:
        return None
    engine = deepspeed_engine(obj)
    if engine is not None:
        return int(engine.zero_optimization_stage())
    if getattr(obj, "is_deepspeed_enabled", False):  # a Trainer whose engine is not built yet
        plugin = getattr(getattr(getattr(obj, "accelerator", None), "state", None), "deepspeed_plugin", None)
        return int(plugin.zero_stage) if plugin is not None else 0
    if isinstance(obj, torch.nn.Module):
        tensors: Iterable[Any] = obj.parameters()
    elif isinstance(obj, Mapping):
        tensors = obj.values()
    elif isinstance(obj, Iterable):
        tensors = obj
    else:
        return None
    return 3 if any(is_zero3_param(t) for t in tensors) else None


def gathered(params: Iterable[torch.Tensor]):
    """Context in which ZeRO-3 partitioned ``params`` hold their full values on every rank (read-only).

    A collective: every rank must enter it. Anything else (plain, DTensor) is left as it is.
    """
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        return nullcontext()
    return _deepspeed().zero.GatheredParameters(params, modifier_rank=None)


def deepspeed_optimizer_states(
    engine, params: Iterable[torch.Tensor], keys: Iterable[str]
) -> list[torch.Tensor | None]:
    """The fp32 optimizer state of each parameter under the first of ``keys`` the optimizer keeps (e.g.
    ``("momentum_buffer", "exp_avg")``); all None before the first step.

    DeepSpeed keys its optimizer state by flat partitions, not by parameter. ZeRO-1/2: the whole state,
    assembled with ``deepspeed.utils.safe_get_full_optimizer_state`` (a collective: every rank must call
    it). ZeRO-3: this rank's partition, laid out like ``params.local_tensor(p)``
    (``safe_get_local_optimizer_state``, padding left out).
    """
    params = list(params)
    zero = getattr(engine, "optimizer", None)
    state = getattr(getattr(zero, "optimizer", None), "state", None) or {}
    present = next(iter(state.values()), {}) if state else {}
    key = next((k for k in keys if k in present), None)
    if key is None:
        return [None] * len(params)
    if any(is_zero3_param(p) for p in params):
        local = _deepspeed().utils.safe_get_local_optimizer_state
        return [_valid(p, local(p, key)) for p in params]
    relink_zero_optimizer_states(zero)  # parameters of later param groups are linked lazily, if ever
    get = _deepspeed().utils.safe_get_full_optimizer_state
    return [get(p, key) for p in params]


def _valid(param: torch.Tensor, partition: torch.Tensor | None) -> torch.Tensor | None:
    """A ZeRO-3 state/gradient partition without its padding, laid out like ``local_tensor(param)``."""
    if partition is None:
        return None
    return partition.reshape(-1).narrow(0, 0, zero3_partition(param)[1])
