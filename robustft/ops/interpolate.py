"""Weight-space interpolation: linear (WiSE-FT), per-tensor SLERP, and spherical means of M task vectors.

θ(α) = (1−α)·θ_start + α·θ_end over lists or name->tensor mappings. α outside [0, 1] is an
extrapolation and must be asked for explicitly. SLERP interpolates along the great circle
between two tensors (flattened) and falls back to linear when they are near-parallel, where
the spherical formula is numerically meaningless. The multi-model spherical merges (WARP's iterated
SLERP, mergekit's ``multislerp`` and ``karcher``) share SLERP's angle (:func:`cos_omega`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from robustft.checks import check_number, short_repr
from robustft.ops import Reduce
from robustft.ops.dtypes import compute_dtype

__all__ = [
    "FUNCTIONS",
    "METHODS",
    "ZERO_SUM",
    "check_alpha",
    "check_method",
    "check_weights",
    "cos_omega",
    "interpolate",
    "interpolate_end_",
    "interpolate_into_",
    "karcher_mean",
    "kept_tensor",
    "lerp",
    "multislerp",
    "slerp",
    "slerp_coefficients",
    "slerp_iterated",
]

METHODS = ("linear", "slerp")

#: |cos| above which SLERP falls back to linear (mergekit uses the same 0.9995)
PARALLEL_THRESHOLD = 0.9995

#: a running sum of weights within this of 0 takes λ = 1/2 in :func:`slerp_iterated` (mergekit's nuslerp)
ZERO_SUM = 1e-6

T = TypeVar("T", Sequence[torch.Tensor], Mapping[str, torch.Tensor])


def check_alpha(alpha: float, extrapolate: bool = False, name: str = "alpha") -> float:
    """α as a float (a real number as :func:`robustft.checks.as_real` has it: never a str or a bool);
    α outside [0, 1] is a ValueError unless ``extrapolate=True``."""
    value = float(check_number(name, alpha))
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


def lerp(
    start: torch.Tensor, end: torch.Tensor, alpha: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """θ(α) = (1−α)·θ_start + α·θ_end (WiSE-FT, Wortsman et al., 2022, arXiv:2109.01903).

    The one linear interpolation of robustft (callbacks, functional API, ``robustft interpolate`` and
    merges): ``torch.lerp`` in :func:`compute_dtype` (half types in float32), rounded to ``start``'s dtype
    (or written into ``out``, which may be ``end`` itself: no temporary). ``start`` is returned
    bit-exactly at α=0 and ``end`` at α=1.
    """
    dtype = start.dtype if out is None else out.dtype
    device = start.device if out is None else out.device
    work = compute_dtype(dtype)
    s = start.to(device=device, dtype=work)
    e = end.to(device=device, dtype=work)
    if out is not None and out.dtype == work:
        return torch.lerp(s, e, alpha, out=out)  # elementwise: out may alias end
    result = torch.lerp(s, e, alpha)
    return result.to(dtype) if out is None else out.copy_(result)


def cos_omega(
    start: torch.Tensor, end: torch.Tensor, reduce: Reduce | None = None, dim: int | None = None
) -> torch.Tensor:
    """cos Ω = <θ_s, θ_e>/(|θ_s||θ_e|) in float64: of the flattened tensors (a 0-d tensor), or of each
    vector along axis ``dim`` (keepdim); 1 where a norm is zero (SLERP's linear case). The one angle of
    robustft's spherical methods; ``reduce`` sums the dot products over ranks (local shards)."""
    s = start.to(dtype=torch.float64)
    e = end.to(device=s.device, dtype=torch.float64)
    if dim is None:
        s, e = s.flatten(), e.flatten()
        sums = torch.stack([s @ s, e @ e, s @ e])
    else:
        sums = torch.stack([(s * s).sum(dim, keepdim=True), (e * e).sum(dim, keepdim=True),
                            (s * e).sum(dim, keepdim=True)])  # fmt: skip
    if reduce is not None:
        sums = reduce(sums)
    norms = sums[0].sqrt() * sums[1].sqrt()
    safe = torch.where(norms == 0, 1.0, norms)
    return torch.where(norms == 0, 1.0, torch.clamp(sums[2] / safe, -1.0, 1.0))


def slerp_coefficients(
    cos: torch.Tensor, alpha: float, threshold: float = PARALLEL_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin((1−α)Ω)/sin Ω, sin(αΩ)/sin Ω) for cos Ω (any shape); (1−α, α) where |cos Ω| > ``threshold``."""
    parallel = cos.abs() > threshold
    omega = torch.acos(torch.where(parallel, 0.0, cos))
    sin_omega = torch.where(parallel, 1.0, torch.sin(omega))
    c_start = torch.where(parallel, 1.0 - alpha, torch.sin((1.0 - alpha) * omega) / sin_omega)
    c_end = torch.where(parallel, alpha, torch.sin(alpha * omega) / sin_omega)
    return c_start, c_end


def slerp(
    start: torch.Tensor,
    end: torch.Tensor,
    alpha: float,
    threshold: float = PARALLEL_THRESHOLD,
    reduce: Reduce | None = None,
    out: torch.Tensor | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """θ(α) = sin((1−α)Ω)/sin Ω · θ_start + sin(αΩ)/sin Ω · θ_end, cos Ω = <θ_s, θ_e>/(|θ_s||θ_e|).

    Spherical linear interpolation (Shoemake, 1985) of the flattened tensors, as used for model
    merging by mergekit; the one SLERP of robustft. Computed in float64, rounded to :func:`compute_dtype`
    and then to ``start``'s dtype (or written into ``out``), so a half tensor gets the same bits whether
    it is interpolated as stored or upcast to float32 first (the merge engine). Falls back to
    :func:`lerp` when |cos Ω| > ``threshold`` (near-parallel) or a tensor is zero, where Ω is
    ill-conditioned. α=0 and α=1 return the endpoints exactly. On local shards (FSDP2) pass ``reduce``
    (a sum over ranks): Ω is then the angle of the whole tensors. ``dim``: interpolate each vector along
    that axis on its own great circle (mergekit's ``nuslerp`` without flattening), the linear case in
    float64 per vector.
    """
    dtype = start.dtype if out is None else out.dtype
    device = start.device if out is None else out.device
    if alpha in (0.0, 1.0):
        src = start if alpha == 0.0 else end
        if out is None:
            return src.to(device=device, dtype=dtype, copy=True)
        return out if src is out else out.copy_(src)
    s = start.to(device=device, dtype=torch.float64)
    e = end.to(device=device, dtype=torch.float64)
    cos = cos_omega(s, e, reduce, dim)
    if dim is None and abs(cos.item()) > threshold:
        return lerp(start, end, alpha, out=out)
    c_start, c_end = slerp_coefficients(cos, alpha, threshold)
    result = (c_start * s + c_end * e).to(compute_dtype(dtype))
    return result.to(dtype) if out is None else out.copy_(result)


def check_weights(weights: Sequence[float] | None, n: int, name: str = "weights") -> list[float]:
    """``n`` finite weights (all 1 when None); else a ValueError naming ``name``."""
    if weights is None:
        return [1.0] * n
    values = [float(check_number(f"{name}[{i}]", w)) for i, w in enumerate(weights)]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} finite numbers, got {short_repr(list(weights))}")
    return values


def slerp_iterated(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    dim: int | None = None,
    threshold: float = PARALLEL_THRESHOLD,
) -> torch.Tensor:
    """WARP's SLERP of M task vectors (Ramé et al., 2024, arXiv:2406.16768, stage 2), iterated for M > 2.

    μ_1 = τ_1, μ_m = slerp(μ_{m−1}, τ_m, λ_m) with λ_m = w_m / (w_1 + … + w_m): for M = 2 the paper's
    θ_init + sin((1−λ)Ω)/sin Ω · δ_1 + sin(λΩ)/sin Ω · δ_2 (λ = w_2/(w_1+w_2)); equal weights give λ_m = 1/m,
    each policy entering with the same share. A running sum of weights within 1e-6 of 0 takes λ = 1/2
    (mergekit's ``nuslerp`` rule). ``dim``: per vector along that axis (:func:`slerp`).
    """
    if not tensors:
        raise ValueError("slerp_iterated: no tensors")
    weights = check_weights(weights, len(tensors))
    merged, total = tensors[0], weights[0]
    for tensor, w in zip(tensors[1:], weights[1:], strict=True):
        total += w
        merged = slerp(merged, tensor, 0.5 if abs(total) < ZERO_SUM else w / total, threshold, dim=dim)
    return merged


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """mergekit's ``multislerp``: barycentre of the directions u_i = τ_i/(|τ_i|+ε) scaled to the mean norm.

    θ = (Σ w_i |τ_i|) · m / |m| with m = Σ w_i u_i (w normalized to sum 1 unless ``normalize_weights`` is
    false). mergekit then maps the tangent vector Σ w_i (u_i − <u_i, m̂> m̂) back through the exponential
    map; that vector is m − |m| m̂ = 0, so the closed form is the same point. When |m| < ε two inputs fall
    back to w_0 τ_0 + w_1 τ_1 and more are a ValueError (antipodal inputs that cancel).
    """
    if not tensors:
        raise ValueError("multislerp: no tensors")
    weights = check_weights(weights, len(tensors))
    if len(tensors) == 1:
        return tensors[0]
    if normalize_weights:
        total = sum(weights)
        if total == 0:
            raise ValueError("multislerp: weights sum to 0; they cannot be normalized")
        weights = [w / total for w in weights]
    dtype = compute_dtype(tensors[0].dtype)
    mean = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    scale = 0.0
    for tensor, w in zip(tensors, weights, strict=True):
        t = tensor.to(torch.float64)
        norm = torch.linalg.vector_norm(t).item()
        mean.add_(t, alpha=w / (norm + eps))
        scale += w * norm
    mean_norm = torch.linalg.vector_norm(mean).item()
    if mean_norm < eps:
        if len(tensors) == 2:
            return (weights[0] * tensors[0].to(torch.float64) + weights[1] * tensors[1].to(torch.float64)).to(
                dtype
            )
        raise ValueError(
            "multislerp: the weighted sum of the unit task vectors is zero (antipodal inputs whose weights "
            "cancel); change the weights"
        )
    return mean.mul_(scale / mean_norm).to(dtype)


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher (Fréchet) mean of the directions on the unit sphere, scaled to the mean norm.

    mergekit's ``karcher``: u_i = τ_i/|τ_i| (inputs with |τ_i| <= ``tol`` left out, the others' weights
    renormalized to w̄_i); start at the normalized Euclidean mean (u of the first input if it is ~0); repeat
    at most ``max_iter`` times: T = Σ w̄_i Ω_i/sin Ω_i · (u_i − cos Ω_i · μ) (cos Ω_i from :func:`cos_omega`,
    terms with Ω_i < tol dropped), stop when |T| < ``tol``, else μ ← cos|T| μ + sin|T| T/|T| (renormalized).
    Result (Σ w_i |τ_i|) μ with the weights normalized over all inputs (equal weights by default).
    """
    if not tensors:
        raise ValueError("karcher: no tensors")
    weights = check_weights(weights, len(tensors))
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weights)
    if total == 0:
        raise ValueError("karcher: weights sum to 0")
    dtype = compute_dtype(tensors[0].dtype)
    points = [t.to(torch.float64) for t in tensors]
    norms = [torch.linalg.vector_norm(p).item() for p in points]
    scale = sum(w * n for w, n in zip(weights, norms, strict=True)) / total
    kept = [(w, p / n) for w, p, n in zip(weights, points, norms, strict=True) if n > tol]
    if not kept:
        return torch.zeros_like(points[0]).to(dtype)
    kept_total = sum(w for w, _ in kept)
    kept = [(w / kept_total, u) for w, u in kept]
    mean = sum(w * u for w, u in kept)
    mean_norm = torch.linalg.vector_norm(mean).item()
    mean = kept[0][1].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in kept:
            cos = cos_omega(mean, u).item()
            omega = math.acos(cos)
            if omega < tol:
                continue
            tangent.add_(u - cos * mean, alpha=w * omega / math.sin(omega))
        step = torch.linalg.vector_norm(tangent).item()
        if step < tol:
            break
        mean = math.cos(step) * mean + (math.sin(step) / step) * tangent
        mean = mean / torch.linalg.vector_norm(mean)
    return (scale * mean).to(dtype)


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
