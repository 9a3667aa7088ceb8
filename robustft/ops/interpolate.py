"""Weight-space interpolation between a start and an end model: linear (WiSE-FT) and per-tensor SLERP.

θ(α) = (1−α)·θ_start + α·θ_end over lists or name->tensor mappings. α outside [0, 1] is an
extrapolation and must be asked for explicitly. SLERP interpolates along the great circle
between two tensors (flattened) and falls back to linear when they are near-parallel, where
the spherical formula is numerically meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from robustft.ops import Reduce

__all__ = [
    "METHODS",
    "check_alpha",
    "interpolate",
    "interpolate_end_",
    "interpolate_into_",
    "lerp",
    "slerp",
]

METHODS = ("linear", "slerp")

#: |cos| above which SLERP falls back to linear (mergekit uses the same 0.9995)
PARALLEL_THRESHOLD = 0.9995

T = TypeVar("T", Sequence[torch.Tensor], Mapping[str, torch.Tensor])


def check_alpha(alpha: float, extrapolate: bool = False, name: str = "alpha") -> float:
    """α as a float; α outside [0, 1] (or non-finite) is a ValueError unless ``extrapolate=True``."""
    try:
        value = float(alpha)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {alpha!r} is not a number") from err
    if not math.isfinite(value):
        raise ValueError(f"{name}: {alpha!r} is not finite")
    if not extrapolate and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name}={value} is outside [0, 1]: that extrapolates beyond the start/fine-tuned models; "
            "pass extrapolate=True (CLI: --extrapolate) if this is intended"
        )
    return value


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def lerp(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ(α) = (1−α)·θ_start + α·θ_end (WiSE-FT, Wortsman et al., 2022, arXiv:2109.01903).

    Computed with ``torch.lerp``, which returns ``start`` bit-exactly at α=0 and ``end`` at α=1.
    Low-precision tensors are interpolated in float32 and cast back.
    """
    work = torch.float32 if start.dtype in (torch.float16, torch.bfloat16) else start.dtype
    out = torch.lerp(start.to(work), end.to(device=start.device, dtype=work), alpha)
    return out.to(start.dtype)


def slerp(
    start: torch.Tensor,
    end: torch.Tensor,
    alpha: float,
    threshold: float = PARALLEL_THRESHOLD,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """θ(α) = sin((1−α)Ω)/sin Ω · θ_start + sin(αΩ)/sin Ω · θ_end, cos Ω = <θ_s, θ_e>/(|θ_s||θ_e|).

    Spherical linear interpolation (Shoemake, 1985) of the flattened tensors, as used for model
    merging by mergekit. Falls back to :func:`lerp` when |cos Ω| > ``threshold`` (near-parallel)
    or a tensor is zero, where Ω is ill-conditioned. α=0 and α=1 return the endpoints exactly.
    On local shards (FSDP2) pass ``reduce`` (a sum over ranks): Ω is then the angle of the whole tensors.
    """
    if alpha == 0.0:
        return start.clone()
    if alpha == 1.0:
        return end.to(device=start.device, dtype=start.dtype, copy=True)
    s = start.to(torch.float64).flatten()
    e = end.to(device=start.device, dtype=torch.float64).flatten()
    sums = torch.stack([s @ s, e @ e, s @ e])
    if reduce is not None:
        sums = reduce(sums)
    ns, ne = sums[0].sqrt(), sums[1].sqrt()
    if ns == 0 or ne == 0:
        return lerp(start, end, alpha)
    cos = torch.clamp(sums[2] / (ns * ne), -1.0, 1.0).item()
    if abs(cos) > threshold:
        return lerp(start, end, alpha)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    out = (math.sin((1.0 - alpha) * omega) / sin_omega) * s + (math.sin(alpha * omega) / sin_omega) * e
    return out.view(start.shape).to(start.dtype)


_FUNCS = {"linear": lerp, "slerp": slerp}


def interpolate(start: T, end: T, alpha: float, method: str = "linear", extrapolate: bool = False) -> T:
    """θ(α) for every tensor of two aligned lists or name->tensor mappings (new tensors, inputs untouched).

    Mappings must have the same keys and every pair the same shape; a mismatch is a ValueError
    naming the tensor.
    """
    alpha = check_alpha(alpha, extrapolate)
    fn = _FUNCS[check_method(method)]
    if isinstance(start, Mapping):
        if not isinstance(end, Mapping):
            raise ValueError("interpolate: start is a mapping but end is not")
        _check_same_keys(start, end)
        out = {}
        for name, s in start.items():
            _check_shape(name, s, end[name])
            out[name] = fn(s, end[name], alpha)
        return out
    if len(start) != len(end):
        raise ValueError(f"interpolate: {len(start)} start tensors for {len(end)} end tensors")
    result = []
    for i, (s, e) in enumerate(zip(start, end, strict=True)):
        _check_shape(f"#{i}", s, e)
        result.append(fn(s, e, alpha))
    return result


@torch.no_grad()
def interpolate_into_(
    out: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    end: Sequence[torch.Tensor],
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    foreach: bool = True,
    reduce: Reduce | None = None,
) -> None:
    """out ← θ(α) in place, tensor by tensor (``start``/``end`` may live on another device or dtype).

    The linear path is ``out ← start; out.lerp_(end, α)`` with fused ``torch._foreach_*`` ops when
    dtypes and devices agree, which gives ``start`` bit-exactly at α=0 and ``end`` at α=1.
    ``out`` must not share storage with ``start`` or ``end``.
    """
    alpha = check_alpha(alpha, extrapolate)
    check_method(method)
    if not len(out) == len(start) == len(end):
        raise ValueError(f"interpolate_into_: {len(out)} outputs, {len(start)} starts, {len(end)} ends")
    for i, (o, s, e) in enumerate(zip(out, start, end, strict=True)):
        _check_shape(f"#{i}", s, e)
        _check_shape(f"#{i}", o, s)
    if method == "slerp":
        for o, s, e in zip(out, start, end, strict=True):
            o.copy_(slerp(s.to(o.device), e, alpha, reduce=reduce))
        return
    same = all(
        s.dtype == o.dtype == e.dtype and s.device == o.device == e.device and o.is_floating_point()
        for o, s, e in zip(out, start, end, strict=True)
    )
    low = any(o.dtype in (torch.float16, torch.bfloat16) for o in out)
    if foreach and same and not low and len(out):
        torch._foreach_copy_(list(out), list(start))
        torch._foreach_lerp_(list(out), list(end), alpha)
        return
    for o, s, e in zip(out, start, end, strict=True):
        o.copy_(lerp(s.to(o.device), e, alpha))


@torch.no_grad()
def interpolate_end_(
    end: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    foreach: bool = True,
    reduce: Reduce | None = None,
) -> None:
    """end ← θ(α) in place, when the live tensors hold θ_end and no second copy is wanted.

    Linear: ``end.lerp_(start, 1−α)``, which leaves ``end`` bit-exact at α=1 and gives ``start``
    bit-exactly at α=0. ``start`` may live on another device or dtype (a CPU snapshot).
    """
    alpha = check_alpha(alpha, extrapolate)
    check_method(method)
    if len(end) != len(start):
        raise ValueError(f"interpolate_end_: {len(end)} live tensors for {len(start)} start tensors")
    for i, (e, s) in enumerate(zip(end, start, strict=True)):
        _check_shape(f"#{i}", s, e)
    if method == "slerp":
        for e, s in zip(end, start, strict=True):
            e.copy_(slerp(s.to(e.device), e, alpha, reduce=reduce))
        return
    same = all(s.dtype == e.dtype and s.device == e.device for e, s in zip(end, start, strict=True))
    low = any(e.dtype in (torch.float16, torch.bfloat16) for e in end)
    if foreach and same and not low and len(end):
        torch._foreach_lerp_(list(end), list(start), 1.0 - alpha)
        return
    for e, s in zip(end, start, strict=True):
        if e.dtype in (torch.float16, torch.bfloat16):
            e.copy_(torch.lerp(e.float(), s.to(device=e.device, dtype=torch.float32), 1.0 - alpha))
        else:
            e.lerp_(s.to(device=e.device, dtype=e.dtype), 1.0 - alpha)


def _check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if set(a) != set(b):
        only_a = sorted(set(a) - set(b))
        only_b = sorted(set(b) - set(a))
        raise ValueError(
            f"start and end have different tensors: only in start {only_a[:5]}, only in end {only_b[:5]}"
        )


def _check_shape(name: str, s: torch.Tensor, e: torch.Tensor) -> None:
    if tuple(s.shape) != tuple(e.shape):
        raise ValueError(f"tensor {name!r}: start has shape {tuple(s.shape)}, end has shape {tuple(e.shape)}")
