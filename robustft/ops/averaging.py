"""Weight averaging over lists of tensors: EMA (decay or half-life), BEMA, SWA and SWALR, LAWA.

Each update has a fused ``torch._foreach_*`` path and a plain per-tensor loop that it is tested
against. ``avg`` may live on another device or dtype than ``live`` (an fp32 CPU shadow of bf16
weights): ``live`` is then cast tensor by tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "bema_coefficients",
    "bema_update_",
    "ema_decay",
    "ema_update_",
    "half_life_decay",
    "mean_of",
    "squared_distance",
    "swa_update_",
    "swalr_lr",
]


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


def half_life_decay(elapsed: float, half_life: float) -> float:
    """Decay 0.5^(elapsed/half_life) for ``elapsed`` steps or tokens: a term's weight halves every half-life.

    Composer's EMA ``half_life`` ("10ba", "1000tok"): smoothing = 2^(−update_interval / half_life).
    """
    if not half_life > 0:
        raise ValueError(f"half_life must be > 0, got {half_life!r}")
    if elapsed < 0:
        raise ValueError(f"elapsed must be >= 0, got {elapsed!r}")
    return 0.5 ** (elapsed / half_life)


def bema_coefficients(step: int, *, ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10,
                      multiplier: float = 1.0, min_ema_multiplier: float = 0.0) -> tuple[float, float]:
    """BEMA's (β_t, α_t) at step t: β_t = max((ρ+γt)^−κ, β_min), α_t = (ρ+γt)^−η (Block et al. 2025; TRL)."""
    age = lag + multiplier * step
    if not age > 0:
        raise ValueError(f"lag + multiplier * step must be > 0, got {age!r} at step {step}")
    return max(age ** -ema_power, min_ema_multiplier), age ** -bias_power


@torch.no_grad()
def bema_update_(
    out: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor],
    live: Sequence[torch.Tensor], beta: float, alpha: float, foreach: bool = True,
) -> None:
    """ema ← (1−β)·ema + β·θ_t, then out ← ema + α·(θ_t − θ_0), in place (bias-corrected EMA, BEMA)."""
    live = _aligned(ema, live)
    if not len(out) == len(ema) == len(theta0):
        raise ValueError(f"bema_update_: {len(out)} outputs, {len(ema)} EMA and {len(theta0)} θ₀ tensors")
    if foreach:
        out, ema, theta0 = list(out), list(ema), list(theta0)
        torch._foreach_lerp_(ema, live, beta)
        torch._foreach_copy_(out, ema)
        torch._foreach_add_(out, live, alpha=alpha)
        torch._foreach_add_(out, theta0, alpha=-alpha)
    else:
        for o, e, t0, l in zip(out, ema, theta0, live):
            e.lerp_(l, beta)
            o.copy_(e + alpha * (l - t0))


def swalr_lr(start_lr: float, swa_lr: float, steps: int, anneal_steps: int, strategy: str = "cos") -> float:
    """Learning rate after ``steps`` SWALR steps from ``start_lr``: swa_lr·a(t) + start_lr·(1−a(t)).

    t = min(1, steps / max(1, anneal_steps)) (t = 1 when anneal_steps is 0), a(t) = (1 − cos πt)/2 for
    "cos" and t for "linear": the closed form of ``torch.optim.swa_utils.SWALR`` when nothing else
    changes the learning rate meanwhile.
    """
    if strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {strategy!r}")
    if anneal_steps < 0 or steps < 0:
        raise ValueError(f"steps and anneal_steps must be >= 0, got {steps} and {anneal_steps}")
    if anneal_steps == 0:
        steps = max(1, steps)
    t = max(0.0, min(1.0, steps / max(1, anneal_steps)))
    a = (1 - math.cos(math.pi * t)) / 2 if strategy == "cos" else t
    return swa_lr * a + start_lr * (1 - a)
