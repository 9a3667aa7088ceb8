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
    "FUNCTIONS",
    "METHODS",
    "check_alpha",
    "check_method",
    "interpolate",
    "interpolate_end_",
    "interpolate_into_",
    "kept_tensor",
    "lerp",
    "slerp",
    "work_dtype",
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
    """``method`` if it is an interpolation method (``linear`` or ``slerp``), else a ValueError naming it."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return method


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype θ(α) is computed in: float64 stays, everything else (float32, half types) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lerp(
    start: torch.Tensor, end: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """θ(α) = (1−α)·θ_start + α·θ_end (WiSE-FT, Wortsman et al., 2022, arXiv:2109.01903).

    The one linear interpolation of robustft (callbacks, functional API, ``robustft interpolate`` and
    merges): ``torch.lerp`` in :func:`work_dtype` (half types in float32), rounded to ``start``'s dtype
    (or written into ``out``, which may be ``end`` itself: no temporary). ``start`` is returned
    bit-exactly at α=0 and ``end`` at α=1.
    """
    dtype = start.dtype if out is None else out.dtype
    device = start.device if out is None else out.device
    work = work_dtype(dtype)
    s = start.to(device=device, dtype=work)
    e = end.to(device=device, dtype=work)
    if out is not None and out.dtype == work:
        return torch.lerp(s, e, alpha, out=out)  # elementwise: out may alias end
    result = torch.lerp(s, e, alpha)
    return result.to(dtype) if out is None else out.copy_(result)


def slerp(
    start: torch.Tensor,
    end: torch.Tensor,
    alpha: float,
    threshold: float = PARALLEL_THRESHOLD,
    reduce: Reduce | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ(α) = sin((1−α)Ω)/sin Ω · θ_start + sin(αΩ)/sin Ω · θ_end, cos Ω = <θ_s, θ_e>/(|θ_s||θ_e|).

    Spherical linear interpolation (Shoemake, 1985) of the flattened tensors, as used for model
    merging by mergekit; the one SLERP of robustft. Computed in float64, rounded to :func:`work_dtype`
    and then to ``start``'s dtype (or written into ``out``), so a half tensor gets the same bits whether
    it is interpolated as stored or upcast to float32 first (the merge engine). Falls back to
    :func:`lerp` when |cos Ω| > ``threshold`` (near-parallel) or a tensor is zero, where Ω is
    ill-conditioned. α=0 and α=1 return the endpoints exactly. On local shards (FSDP2) pass ``reduce``
    (a sum over ranks): Ω is then the angle of the whole tensors.
    """
    dtype = start.dtype if out is None else out.dtype
    device = start.device if out is None else out.device
    if alpha in (0.0, 1.0):
        src = start if alpha == 0.0 else end
        if out is None:
            return src.to(device=device, dtype=dtype, copy=True)
        return out if src is out else out.copy_(src)
    s = start.to(device=device, dtype=torch.float64).flatten()
    e = end.to(device=device, dtype=torch.float64).flatten()
    sums = torch.stack([s @ s, e @ e, s @ e])
    if reduce is not None:
        sums = reduce(sums)
    ns, ne = sums[0].sqrt(), sums[1].sqrt()
    cos = torch.clamp(sums[2] / (ns * ne), -1.0, 1.0).item() if ns != 0 and ne != 0 else 1.0
    if abs(cos) > threshold:
        return lerp(start, end, alpha, out=out)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    result = (math.sin((1.0 - alpha) * omega) / sin_omega) * s + (math.sin(alpha * omega) / sin_omega) * e
    result = result.view(start.shape).to(work_dtype(dtype))
    return result.to(dtype) if out is None else out.copy_(result)


FUNCTIONS = {"linear": lerp, "slerp": slerp}


def kept_tensor(name: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> torch.Tensor:
    """A non-floating tensor (ids, masks, counters) has no θ(α): equal in every model, it is kept."""
    first = tensors[0]
    for t, label in zip(tensors[1:], labels[1:], strict=True):
        if t.is_floating_point() != first.is_floating_point():
            raise ValueError(
                f"tensor {name!r}: floating point in one model only ({first.dtype} in {labels[0]}, "
                f"{t.dtype} in {label})"
            )
        if not torch.equal(first, t.to(first.dtype)):
            raise ValueError(f"tensor {name!r}: non-floating tensors differ between {labels[0]} and {label}")
    return first


def interpolate(start: T, end: T, alpha: float, method: str = "linear", extrapolate: bool = False) -> T:
    """θ(α) for every tensor of two aligned lists or name->tensor mappings (new tensors, inputs untouched).

    Floating tensors are interpolated by :func:`lerp`/:func:`slerp`; other tensors must be equal in both
    (:func:`kept_tensor`) and are copied. Mappings must have the same keys and every pair the same
    shape; a mismatch is a ValueError naming the tensor.
    """
    alpha = check_alpha(alpha, extrapolate)
    fn = FUNCTIONS[check_method(method)]
    if isinstance(start, Mapping):
        if not isinstance(end, Mapping):
            raise ValueError("interpolate: start is a mapping but end is not")
        _check_same_keys(start, end)
        return {name: _one(name, s, end[name], alpha, fn) for name, s in start.items()}
    if len(start) != len(end):
        raise ValueError(f"interpolate: {len(start)} start tensors for {len(end)} end tensors")
    return [_one(f"#{i}", s, e, alpha, fn) for i, (s, e) in enumerate(zip(start, end, strict=True))]


def _one(name: str, s: torch.Tensor, e: torch.Tensor, alpha: float, fn) -> torch.Tensor:
    _check_shape(name, s, e)
    if s.is_floating_point() and e.is_floating_point():
        return fn(s, e, alpha)
    return kept_tensor(name, [s, e], ["start", "end"]).clone()


@torch.no_grad()
def interpolate_into_(
    out: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    end: Sequence[torch.Tensor],
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    reduce: Reduce | None = None,
) -> None:
    """out ← θ(α) in place, tensor by tensor (``start``/``end`` may live on another device or dtype).

    Each tensor goes through :func:`lerp`/:func:`slerp` with ``out=``, so the bits are those of
    :func:`interpolate`; ``start`` comes back bit-exactly at α=0 and ``end`` at α=1.
    ``out`` must not share storage with ``start`` or ``end``.
    """
    alpha = check_alpha(alpha, extrapolate)
    fn = FUNCTIONS[check_method(method)]
    if not len(out) == len(start) == len(end):
        raise ValueError(f"interpolate_into_: {len(out)} outputs, {len(start)} starts, {len(end)} ends")
    for i, (o, s, e) in enumerate(zip(out, start, end, strict=True)):
        _check_shape(f"#{i}", s, e)
        _check_shape(f"#{i}", o, s)
    for o, s, e in zip(out, start, end, strict=True):
        _apply(fn, s, e, alpha, o, reduce)


@torch.no_grad()
def interpolate_end_(
    end: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    reduce: Reduce | None = None,
) -> None:
    """end ← θ(α) in place, when the live tensors hold θ_end and no second copy is wanted.

    The same :func:`lerp`/:func:`slerp` as :func:`interpolate`, written into ``end`` (the linear path
    needs no temporary when ``start`` has ``end``'s dtype and device). ``start`` may live on another
    device or dtype (a CPU snapshot).
    """
    alpha = check_alpha(alpha, extrapolate)
    fn = FUNCTIONS[check_method(method)]
    if len(end) != len(start):
        raise ValueError(f"interpolate_end_: {len(end)} live tensors for {len(start)} start tensors")
    for i, (e, s) in enumerate(zip(end, start, strict=True)):
        _check_shape(f"#{i}", s, e)
    for e, s in zip(end, start, strict=True):
        _apply(fn, s, e, alpha, e, reduce)


def _apply(
    fn, s: torch.Tensor, e: torch.Tensor, alpha: float, out: torch.Tensor, reduce: Reduce | None
) -> None:
    if fn is slerp:
        slerp(s, e, alpha, reduce=reduce, out=out)
    else:
        lerp(s, e, alpha, out=out)


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
