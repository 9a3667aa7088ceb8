"""Weight averaging updates over lists of tensors: EMA, SWA (equal-weight running mean), LAWA, distances.

Each update has a fused ``torch._foreach_*`` path and a plain per-tensor loop that it is tested
against. ``avg`` may live on another device or dtype than ``live`` (an fp32 CPU shadow of bf16
weights): ``live`` is then cast tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ema_decay", "ema_update_", "mean_of", "squared_distance", "swa_update_"]


def _aligned(avg: Sequence[torch.Tensor], live: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(avg) != len(live):
        raise ValueError(f"{len(avg)} averaged tensors for {len(live)} live tensors")
    return [l if (l.dtype == a.dtype and l.device == a.device) else l.to(a) for a, l in zip(avg, live)]


@torch.no_grad()
def ema_update_(
    avg: Sequence[torch.Tensor], live: Sequence[torch.Tensor], decay: float, foreach: bool = True
) -> None:
    """avg ← decay·avg + (1−decay)·live, in place (Polyak averaging; timm ModelEmaV3 / swa_utils EMA)."""
    live = _aligned(avg, live)
    if foreach:
        torch._foreach_lerp_(list(avg), live, 1.0 - decay)
    else:
        for a, l in zip(avg, live):
            a.lerp_(l, 1.0 - decay)


@torch.no_grad()
def swa_update_(
    avg: Sequence[torch.Tensor], live: Sequence[torch.Tensor], n_averaged: int, foreach: bool = True
) -> None:
    """avg ← avg + (live − avg)/(n+1): equal-weight running mean of n+1 snapshots (Izmailov et al., 2018)."""
    if n_averaged < 0:
        raise ValueError(f"n_averaged must be >= 0, got {n_averaged}")
    live = _aligned(avg, live)
    if n_averaged == 0:
        for a, l in zip(avg, live):
            a.copy_(l)
        return
    weight = 1.0 / (n_averaged + 1)
    if foreach:
        torch._foreach_lerp_(list(avg), live, weight)
    else:
        for a, l in zip(avg, live):
            a.lerp_(l, weight)


def ema_decay(step: int, decay: float, warmup: bool = False, warmup_gamma: float = 1.0,
              warmup_power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """Decay at optimizer step ``step``: ``decay``, or with warmup min(decay, 1 − (1 + step/γ)^−p) (timm)."""
    if not warmup:
        return decay
    warm = 1.0 - (1.0 + step / warmup_gamma) ** -warmup_power
    return max(min(decay, warm), min_decay)


@torch.no_grad()
def mean_of(out: Sequence[torch.Tensor], snapshots: Sequence[Sequence[torch.Tensor]]) -> None:
    """out ← (1/k)·Σ_i snapshots[i], tensor by tensor (LAWA: latest weight averaging, Kaddour 2022)."""
    if not snapshots:
        raise ValueError("mean_of needs at least one snapshot")
    torch._foreach_copy_(list(out), list(snapshots[0]))
    for snap in snapshots[1:]:
        torch._foreach_add_(list(out), list(snap))
    torch._foreach_div_(list(out), float(len(snapshots)))


@torch.no_grad()
def squared_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖a_i − b_i‖² as a float64 scalar on CPU (local part; sum over ranks for sharded tensors)."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, _aligned(a, b)):
        total += (x.double() - y.double()).pow(2).sum().cpu()
    return total
