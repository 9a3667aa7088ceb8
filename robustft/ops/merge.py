"""Merge rules on task vectors, one tensor at a time: task arithmetic, TIES, DARE, DELLA, Breadcrumbs, SCE,
RAM, Model Stock, Fisher averaging, RegMean, consensus/TALL masks, NearSwap, Arcee Fusion, and the SVD
merges of layer task matrices TSV-M, Iso-C, Iso-CTS (linear and SLERP interpolation:
``robustft.ops.interpolate``).

A task vector (delta) is ``theta_i - theta_base`` for one tensor. Every function here is pure: tensors in,
a new tensor out, inputs untouched, no I/O. Functions that return a *delta* leave adding it to the base
(and scaling it by a global lambda) to the caller; ``model_stock``, ``fisher_merge`` and ``regmean``
return merged *weights*. Randomised rules take a ``torch.Generator`` or an integer seed and are reproducible.

Ties in magnitude: pruning keeps exactly ``k`` elements (:func:`top_k_cut`: an exact k-th value from a
sampled bracket, never a full sort or ``topk``); of several equal magnitudes at the cut, the lowest flat
indices are kept. TIES sign election: where the (weighted) sum of trimmed deltas is exactly zero the elected
sign is +1 (as mergekit), so e.g. +a and -a merge to +a.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from robustft.ops.dtypes import compute_dtype

__all__ = [
    "arcee_fusion",
    "breadcrumbs",
    "combine",
    "consensus_mask",
    "consensus_merge",
    "dare",
    "dare_merge",
    "della",
    "della_keep_probabilities",
    "della_merge",
    "disjoint_mean",
    "elect_sign",
    "fisher_merge",
    "iso_c",
    "iso_cts",
    "iso_cts_sizes",
    "l1_rescale",
    "magnitude_prune",
    "model_stock",
    "nearswap",
    "pack_mask",
    "ram",
    "random_drop",
    "ramplus_tl",
    "regmean",
    "sce",
    "tall_compress",
    "tall_masks",
    "tall_reconstruct",
    "task_arithmetic",
    "ties",
    "top_k_cut",
    "top_k_mask",
    "trim_top_k",
    "tsv_merge",
    "unpack_mask",
]


def _check_same_shape(tensors: Sequence[torch.Tensor], what: str = "deltas") -> None:
    if len(tensors) == 0:
        raise ValueError(f"{what}: need at least one tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)} ({what}[0])")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} weights for {n} tensors")
    return weights


def _per_input(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} values for {n} tensors")
    return value


def _check_fraction(value: float, name: str, upper_open: bool = False) -> None:
    if not (0.0 <= value <= 1.0) or (upper_open and value >= 1.0) or math.isnan(value):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


#: flat tensors up to this size are selected with one ``torch.kthvalue``; larger ones by a sampled bracket
_SELECT_DIRECT = 1 << 16
#: elements per chunk of the streamed passes (1 MiB of float32: stays in cache between the passes)
CHUNK = 1 << 18


def _chunks(n: int) -> range:
    return range(0, n, CHUNK)


def _key(x: torch.Tensor, absolute: bool) -> torch.Tensor:
    return x.abs() if absolute else x


def _within(v: torch.Tensor, lo: float, hi: float, masks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The entries of ``v`` (flat) in [lo, hi]. The mask is built in float (``masks``: two float32 buffers at
    least as long as ``v``, reused): torch's float compares are ~10x faster than its boolean ones here
    (numpy's boolean indexing would be ~3x faster still, but ops/ is torch only)."""
    inside, upper = (m[: v.numel()] for m in masks)
    torch.ge(v, lo, out=inside).mul_(torch.le(v, hi, out=upper))
    return v[inside.bool()]


def top_k_cut(x: torch.Tensor, k: int, absolute: bool = False) -> tuple[float, int]:
    """(threshold, last): the ``k`` largest entries of ``x`` (flat; of ``|x|`` if ``absolute``) are those
    above ``threshold`` plus those equal to it at flat index <= ``last``: exactly k, ties at the cut going
    to the lowest indices. ``threshold`` is the k-th largest value (= ``torch.kthvalue(v, n - k + 1)``),
    found without sorting: a seeded random sample brackets it, one chunked pass counts the entries above
    the bracket and collects the few inside (about 8 / sqrt(sample size) of them), and only those are
    selected among (the whole tensor only when the bracket misses). 1 <= k <= numel; NaN is refused.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"top_k_cut: k must be in [1, {n}], got {k}")
    above = equal = None  # counts of entries above / equal to the threshold, when known
    if n > _SELECT_DIRECT:
        m = min(1 << 16, max(1 << 12, n >> 6))
        gen = torch.Generator(device=flat.device).manual_seed(0)
        sample = _key(flat[torch.randint(n, (m,), generator=gen, device=flat.device)], absolute)
        p = (n - k) / n  # ascending rank of the k-th largest, as a fraction
        margin = 4.0 * math.sqrt(m * p * (1 - p)) + 2.0
        lo_i, hi_i = math.floor(p * m - margin), math.ceil(p * m + margin)  # 0-based ranks in the sample
        lo = float(torch.kthvalue(sample, lo_i + 1).values) if lo_i > 0 else -math.inf
        hi = float(torch.kthvalue(sample, hi_i + 1).values) if hi_i < m - 1 else math.inf
        # buffers allocated once: per-chunk temporaries between the kept pieces of ``inside`` would pin
        # glibc's heap (measured: +96 MB resident on a 98 MB tensor)
        size = min(n, CHUNK)
        count = torch.empty(size, device=flat.device)  # float32: exact counts up to 2^24
        keys = torch.empty(size, dtype=flat.dtype, device=flat.device)
        masks = (torch.empty(size, device=flat.device), torch.empty(size, device=flat.device))
        over, inside = 0, []
        for s in _chunks(n):
            chunk = flat[s : s + CHUNK]
            v = torch.abs(chunk, out=keys[: chunk.numel()]) if absolute else chunk
            over += int(torch.gt(v, hi, out=count[: v.numel()]).sum())  # float 1/0: ~10x faster than bool
            inside.append(_within(v, lo, hi, masks))
        inside = torch.cat(inside)
        rank = k - over  # rank from the top among the entries inside the bracket
        if 1 <= rank <= inside.numel():
            threshold = float(torch.kthvalue(inside, inside.numel() - rank + 1).values)
            above, equal = over + int((inside > threshold).sum()), int((inside == threshold).sum())
        del inside
    if above is None:
        keys = _key(flat, absolute)
        threshold = float(torch.kthvalue(keys, n - k + 1).values)
        above, equal = int((keys > threshold).sum()), int((keys == threshold).sum())
    need = k - above  # entries equal to the threshold to keep
    if not 1 <= need <= equal:
        raise ValueError("the tensor holds NaN: its top k entries are undefined")
    if need == equal:
        return threshold, n - 1
    seen = 0
    for s in _chunks(n):
        hits = torch.nonzero(_key(flat[s : s + CHUNK], absolute).eq(threshold)).view(-1)
        if seen + hits.numel() >= need:
            return threshold, s + int(hits[need - seen - 1])
        seen += hits.numel()
    raise AssertionError("unreachable: the equal entries were counted above")


def _keep_(v: torch.Tensor, threshold: float, last: int, start: int) -> torch.Tensor:
    """In place: the keys ``v`` of the chunk starting at flat index ``start`` become the mask of a
    :func:`top_k_cut` selection, 1.0 kept, 0.0 dropped (float masks: torch's float kernels are ~10x faster
    than its boolean ones here)."""
    if last >= start + v.numel() - 1:
        return torch.ge(v, threshold, out=v)
    if last < start:
        return torch.gt(v, threshold, out=v)
    head = last - start + 1
    tie = torch.eq(v[:head], threshold)
    torch.gt(v, threshold, out=v)
    v[:head].add_(tie)
    return v


def top_k_mask(values: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Boolean mask (flat) of exactly ``k`` largest (or smallest) entries of ``values`` (flat); ties at the
    cut go to the lowest indices (:func:`top_k_cut`)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k <= 0:
        return mask
    if k >= values.numel():
        return mask.fill_(True)
    keys = values if largest else values.neg()
    cut = top_k_cut(keys, k)
    for s in _chunks(values.numel()):
        mask[s : s + CHUNK] = _keep_(keys[s : s + CHUNK].clone(), *cut, s)
    return mask


def task_arithmetic(
    deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """tau = sum_i w_i * tau_i: weighted sum of task vectors (Ilharco et al., 2023, "Editing Models with Task
    Arithmetic"); the caller adds ``lambda * tau`` to the base. Negative weights negate a task.
    ``out`` (not one of the deltas) receives the sum instead of a new tensor.
    """
    _check_same_shape(deltas)
    out = torch.zeros_like(deltas[0]) if out is None else out.zero_()
    for w, d in zip(_weights(weights, len(deltas)), deltas, strict=True):
        out.add_(d, alpha=w)
    return out


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """delta * 1{|delta| in the top k}, k = max(1, floor(density * numel)): keep the largest magnitudes.

    Magnitude pruning of a task vector, the "trim" step of TIES (Yadav et al., 2023). ``density=1`` keeps all.
    Exactly k entries are kept (:func:`top_k_cut`: ties at the cut go to the lowest flat indices).
    """
    _check_fraction(density, "density")
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    if density == 0.0:
        return torch.zeros_like(delta)
    flat = delta.detach().reshape(-1)
    cut = top_k_cut(flat, max(1, int(density * flat.numel())), absolute=True)
    out = torch.empty_like(flat)
    keys = torch.empty_like(flat[:CHUNK])  # allocated once (see top_k_cut)
    for s in _chunks(flat.numel()):
        chunk = flat[s : s + CHUNK]
        mask = _keep_(torch.abs(chunk, out=keys[: chunk.numel()]), *cut, s)
        torch.mul(chunk, mask, out=out[s : s + CHUNK])
    return out.view(delta.shape)


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Trim of TIES: keep the top ``density`` fraction of ``delta`` by magnitude (= ``magnitude_prune``)."""
    return magnitude_prune(delta, density)


def elect_sign(
    deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """gamma = sgn(sum_i tau_i), sgn(0) = +1: the sign of larger total mass (TIES, Yadav et al., 2023).

    Returns a tensor of +1/-1 in the deltas' dtype (``out`` if given); with ``weights`` the sum is
    sum_i w_i tau_i.
    """
    total = task_arithmetic(deltas, weights, out)
    return torch.ge(total, 0, out=total).mul_(2).sub_(1)  # 1.0/0.0 -> +1/-1 (NaN sums: -1)


def disjoint_mean(
    deltas: Sequence[torch.Tensor],
    sign: torch.Tensor,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau_m = sum_i w_i m_i tau_i / sum_i w_i m_i, m_i = 1{sgn(w_i tau_i) = gamma}: mean of agreeing entries.

    Disjoint merge of TIES (Yadav et al., 2023); ``sign`` holds gamma (+1/-1, :func:`elect_sign`); zero
    where no input agrees with the elected sign (an exact zero never agrees). With ``weights=None`` it is
    the plain mean over agreeing tasks; ``normalize=False`` returns the numerator alone (the disjoint sum:
    mergekit's ``normalize: false``); where the divisor is 0 it is taken as 1 (as mergekit). Streamed in
    chunks: the temporaries are a few chunks, not tensors,
    allocated once (freed and re-allocated chunks fragment glibc's heap: tens of MB of resident slack).
    ``out`` (contiguous, not one of the inputs) receives the result instead of a new tensor.
    """
    _check_same_shape(deltas)
    if sign.shape != deltas[0].shape:
        raise ValueError(f"sign has shape {tuple(sign.shape)}, expected {tuple(deltas[0].shape)}")
    w = _weights(weights, len(deltas))
    flats = [d.detach().reshape(-1) for d in deltas]
    gamma = sign.reshape(-1)
    # masks are float 1.0/0.0 (torch's float kernels are ~10x faster than its boolean ones); a kept entry is
    # d * mask, except in non-finite deltas (inf * 0 is NaN), where masked_fill keeps the exact zeros
    finite = all(math.isfinite(float(f.sum())) for f in flats)
    result = torch.empty_like(flats[0]) if out is None else out.view(-1)
    n = result.numel()
    buffers = [torch.empty_like(result[: min(n, CHUNK)]) for _ in range(3)]
    for s in _chunks(n):
        part, size = slice(s, s + CHUNK), min(CHUNK, n - s)
        num = result[part].zero_()
        den, agree, kept = (b[:size] for b in buffers)
        den.zero_()
        for wi, f in zip(w, flats, strict=True):
            if wi == 0:
                continue
            d = f[part]
            # sgn(w d) = gamma  <=>  d * gamma has the sign of w (exact: gamma is +1/-1; 0 * gamma is 0)
            (torch.gt if wi > 0 else torch.lt)(torch.mul(d, gamma[part], out=agree), 0, out=agree)
            num.add_(torch.mul(d, agree, out=kept) if finite else d.masked_fill(agree == 0, 0), alpha=wi)
            den.add_(agree, alpha=wi)
        if normalize:  # a zero divisor becomes 1, as mergekit (mixed-sign weights that cancel keep the sum)
            num.div_(den.add_(torch.eq(den, 0, out=agree)))
    return result.view(deltas[0].shape) if out is None else out


def ties(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float],
    weights: Sequence[float] | None = None,
    out: torch.Tensor | None = None,
    normalize: bool = True,
    rescale: bool = False,
) -> torch.Tensor:
    """TIES: trim each tau_i to its top-``density`` magnitudes, elect gamma = sgn(sum_i w_i trim(tau_i)),
    return the disjoint (weighted) mean of the entries agreeing with gamma (Yadav et al., 2023, TIES-Merging).

    ``density`` may be one value or one per delta; weights follow mergekit (sign elected on the weighted sum,
    weighted disjoint mean). Tie rule: sgn(0) = +1. Streamed: each delta's cut (:func:`top_k_cut`) is found
    first, then trim, election and mean run chunk by chunk, so the temporaries are a few chunks, not
    tensors. ``out`` (contiguous; may be one of ``deltas``, each chunk is read before it is written)
    receives the result instead of a new tensor. ``normalize=False``: the disjoint sum (mergekit's
    ``normalize: false``); ``rescale``: each trimmed delta is scaled back to its L1 norm (mergekit's
    ``rescale``, :func:`l1_rescale`; one more chunked pass over the trimmed deltas).
    """
    _check_same_shape(deltas)
    densities = _per_input(density, len(deltas), "density")
    for p in densities:
        _check_fraction(p, "density")
    w = _weights(weights, len(deltas))
    if out is None:
        out = torch.empty_like(deltas[0], memory_format=torch.contiguous_format)
    elif out.shape != deltas[0].shape or not out.is_contiguous():
        raise ValueError(f"ties: out must be contiguous with shape {tuple(deltas[0].shape)}")
    flats = [d.detach().reshape(-1) for d in deltas]
    n = flats[0].numel()
    # (threshold, last) of each trimmed delta; None: kept whole (density 1), or nothing kept (density 0)
    cuts = [
        top_k_cut(f, max(1, int(p * n)), absolute=True) if 0 < p < 1 and n else None
        for f, p in zip(flats, densities, strict=True)
    ]
    result = out.view(-1)
    # chunk buffers allocated once: trimmed chunks (copies: ``out`` may alias an input), keys, sign
    m = min(n, CHUNK)
    buffers = [torch.empty_like(flats[0][:m]) for _ in range(len(flats) + 2)]
    factors = _trim_rescale(flats, cuts, buffers[-2]) if rescale else [1.0] * len(flats)
    for s in _chunks(n):
        size = min(CHUNK, n - s)
        *trim_bufs, keys, sign = (b[:size] for b in buffers)
        trimmed = []
        for f, p, cut, buf, factor in zip(flats, densities, cuts, trim_bufs, factors, strict=True):
            chunk = f[s : s + CHUNK]
            if cut is not None:
                torch.mul(chunk, _keep_(torch.abs(chunk, out=keys), *cut, s), out=buf)
            elif p == 0:
                buf.zero_()
            else:
                buf.copy_(chunk)
            if factor != 1.0:
                buf.mul_(factor)
            trimmed.append(buf)
        disjoint_mean(trimmed, elect_sign(trimmed, w, out=sign), w, normalize, out=result[s : s + CHUNK])
    return out


def _trim_rescale(flats: list[torch.Tensor], cuts: list, keys: torch.Tensor) -> list[float]:
    """|tau_i|_1 / |trim(tau_i)|_1 per delta, chunk by chunk (1 where either norm is below 1e-7, as
    :func:`l1_rescale`): the factors of mergekit's ``rescale`` after a magnitude trim."""
    factors = []
    for f, cut in zip(flats, cuts, strict=True):
        if cut is None:  # kept whole (factor 1) or nothing kept (zeros stay zeros)
            factors.append(1.0)
            continue
        before = after = 0.0
        for s in _chunks(f.numel()):
            chunk = f[s : s + CHUNK]
            v = torch.abs(chunk, out=keys[: chunk.numel()])
            before += float(v.sum(dtype=torch.float64))
            after += float(v.mul_(_keep_(v.clone(), *cut, s)).sum(dtype=torch.float64))
        factors.append(1.0 if before < 1e-7 or after < 1e-7 else before / after)
    return factors


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """delta * m / (1 - p), m_j ~ Bernoulli(1 - p): drop and rescale, unbiased since E[m/(1-p)] = 1.

    DARE (Yu et al., 2024, "Language Models are Super Mario"). ``generator`` makes it reproducible.
    """
    _check_fraction(drop_rate, "drop_rate", upper_open=True)
    if drop_rate == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= drop_rate
    return delta * keep.to(delta.dtype) / (1.0 - drop_rate)


def random_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """delta * m, m_j ~ Bernoulli(``density``), then (``rescale``) scaled back to delta's L1 norm: mergekit's
    ``dare_*`` sparsification (``density`` is the keep probability; >= 1 keeps everything and draws nothing).

    The draw is m_j = 1{u_j < density}, u = torch.rand(delta.shape, generator=generator): the same
    distribution as mergekit's ``torch.bernoulli`` from another random stream. With ``rescale`` the L1 norm
    is restored (:func:`l1_rescale`, mergekit's rule), not the paper's 1/density (:func:`dare`).
    """
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device).lt_(density)
    masked = delta * keep.to(delta.dtype)
    return l1_rescale(masked, delta) if rescale else masked


def combine(
    deltas: Sequence[torch.Tensor], weights: Sequence[float] | None, consensus: bool, normalize: bool
) -> torch.Tensor:
    """mergekit's last step of its task-vector methods: with ``consensus`` the TIES sign election and the
    disjoint sum (a weighted mean of the agreeing entries with ``normalize``), else sum_i w_i tau_i (divided
    by sum_i w_i with ``normalize``, unless that is below 1e-8 in magnitude)."""
    w = _weights(weights, len(deltas))
    if consensus:
        return disjoint_mean(deltas, elect_sign(deltas, w), w, normalize)
    out = task_arithmetic(deltas, w)
    return out.div_(sum(w)) if normalize and abs(sum(w)) >= 1e-8 else out


def dare_merge(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float],
    seed: int,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rescale: bool = True,
    normalize: bool = False,
) -> torch.Tensor:
    """mergekit's ``dare_linear`` / ``dare_ties``: :func:`random_drop` each tau_i (keep probability
    ``density``, L1 rescale), then :func:`combine` (``"ties"``: sign election and disjoint sum or mean;
    ``"linear"``: weighted sum or mean) (Yu et al., 2024, "Language Models are Super Mario").

    One ``torch.Generator`` seeded with ``seed`` draws the masks of deltas 0, 1, ... in order.
    """
    _check_same_shape(deltas)
    if method not in ("linear", "ties"):
        raise ValueError(f"method must be 'linear' or 'ties', got {method!r}")
    densities = _per_input(density, len(deltas), "density")
    gen = torch.Generator(device=deltas[0].device).manual_seed(int(seed))
    dropped = [random_drop(d, p, gen, rescale) for d, p in zip(deltas, densities, strict=True)]
    return combine(dropped, weights, method == "ties", normalize)


def l1_rescale(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """masked * |original|_1 / |masked|_1: restore the L1 norm a drop removed (mergekit's ``rescale``).

    Left unscaled when either norm is below ``eps`` (nothing left, or nothing to restore). In place.
    """
    before, after = original.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_j = density - epsilon + 2 epsilon (r_j - 1) / (n - 1): keep probability rising with magnitude rank.

    MagPrune of DELLA (Deep et al., 2024): r_j is the rank (1 = smallest) of |delta_j| among the n entries
    of its row (a 2-D tensor's rows; a 1-D tensor is one row; higher ranks flatten all but the first dim),
    so the smallest entry is kept with probability density - epsilon and the largest with density +
    epsilon. A row of one entry gets p = density. Returns float32 probabilities shaped as ``delta``.
    """
    rows = delta.detach().reshape(1, -1) if delta.dim() < 2 else delta.detach().reshape(delta.shape[0], -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float32, device=delta.device).expand_as(ranks))
    del order  # in place from here on: the rounding of (d - e) + r * 2 * e, one float32 tensor alive
    rank_norm = ranks.div_(n - 1) if n > 1 else ranks.fill_(0.5)
    return rank_norm.mul_(2).mul_(epsilon).add_(density - epsilon).view(delta.shape)


def della(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """delta * m, m_j ~ Bernoulli(p_j) with p_j of :func:`della_keep_probabilities`; with ``rescale`` the
    L1 norm of delta is restored (:func:`l1_rescale`, as mergekit; the paper's per-entry 1/p_j differs).

    DELLA MagPrune (Deep et al., 2024, "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling"). ``density >= 1`` keeps everything; else density +/- epsilon must lie in
    (0, 1). The mask draws m_j = 1{u_j < p_j}, u = torch.rand(delta.shape, generator=generator).
    """
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:  # as mergekit: nothing kept
        return torch.zeros_like(delta)
    if not (epsilon >= 0 and 0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"della: density +/- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
        )
    probs = della_keep_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device).lt_(probs)  # 1.0 / 0.0
    del probs
    masked = delta * keep.to(delta.dtype)
    del keep
    return l1_rescale(masked, delta) if rescale else masked


def della_merge(
    deltas: Sequence[torch.Tensor],
    density: float | Sequence[float],
    epsilon: float | Sequence[float],
    seed: int,
    weights: Sequence[float] | None = None,
    method: str = "ties",
    rescale: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """DELLA each tau_i, then combine: ``"ties"`` (elect sgn(sum_i w_i tau~_i), disjoint mean, or sum when
    not ``normalize``) or ``"linear"`` (sum_i w_i tau~_i, divided by sum_i w_i when ``normalize``; a sum
    below 1e-8 in magnitude is not divided by, as mergekit) (Deep et al., 2024).

    One ``torch.Generator`` seeded with ``seed`` draws the masks of deltas 0, 1, ... in order.
    """
    _check_same_shape(deltas)
    if method not in ("linear", "ties"):
        raise ValueError(f"method must be 'linear' or 'ties', got {method!r}")
    densities = _per_input(density, len(deltas), "density")
    epsilons = _per_input(epsilon, len(deltas), "epsilon")
    w = _weights(weights, len(deltas))
    gen = torch.Generator(device=deltas[0].device).manual_seed(int(seed))
    dropped = [della(d, p, e, gen, rescale) for d, p, e in zip(deltas, densities, epsilons, strict=True)]
    return combine(dropped, w, method == "ties", normalize)


def breadcrumbs(
    delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """delta * 1{rank of |delta| among the kept}: mergekit's ``magnitude_outliers`` (Model Breadcrumbs,
    Davari & Belilovsky, 2024): keep k = floor(density n) entries after dropping the floor(gamma n)
    largest (fewer when k + floor(gamma n) > n: then the k smallest are kept) and the smallest rest;
    ``density >= 1`` keeps everything (``gamma`` then has no effect, as in mergekit). ``rescale``: restore
    the L1 norm.
    """
    _check_fraction(density, "density")
    _check_fraction(gamma, "gamma")
    if density >= 1.0:
        return delta.clone()
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    magnitude = delta.detach().reshape(-1).abs().float()
    drop = top_k_mask(magnitude, n - target - n_bot, largest=True)
    if n_bot:  # the smallest among the entries not already dropped as outliers
        drop |= top_k_mask(magnitude.masked_fill(drop, float("inf")), n_bot, largest=False)
    masked = delta * (~drop).view_as(delta)
    return l1_rescale(masked, delta) if rescale else masked


def model_stock(
    base: torch.Tensor, finetuned: Sequence[torch.Tensor], filter_wise: bool = False
) -> torch.Tensor:
    """w_H = t * mean_i(w_i) + (1 - t) * w_0, t = N cos(theta) / (1 + (N - 1) cos(theta)), per tensor (layer).

    Model Stock (Jang et al., 2024), as mergekit's ``model_stock``: cos(theta) is the mean pairwise cosine
    between the fine-tuned deltas w_i - w_0 (N >= 2), <a, b> / max(|a||b|, 1e-6); where
    |1 + (N-1)cos(theta)| < 1e-6 the base is kept. ``filter_wise``: one t per row (the last axis; a 1-D
    tensor is one row), as mergekit's ``filter_wise: true``.
    """
    _check_same_shape([base, *finetuned], "base+finetuned")
    n = len(finetuned)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned tensors, got {n}")
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.reshape(w0.shape) for w in finetuned]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in finetuned]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = n * cos_theta / denominator.masked_fill(singular, 1)
    t = torch.where(singular, torch.zeros_like(cos_theta), t)
    average = task_arithmetic(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def fisher_merge(
    params: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    eps: float = 1e-8,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """theta* = sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps), elementwise with diagonal Fishers F_i.

    Fisher-weighted averaging (Matena & Raffel, 2022); ``eps`` turns entries no model has information about
    into the plain (weighted) average.
    """
    _check_same_shape(list(params) + list(fishers), "params+fishers")
    if len(params) != len(fishers):
        raise ValueError(f"fisher_merge: {len(params)} parameter tensors for {len(fishers)} Fishers")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for i, f in enumerate(fishers):
        if bool((f < 0).any()):
            raise ValueError(f"fishers[{i}] has negative entries: a diagonal Fisher is a mean of squares")
    num = torch.zeros_like(params[0])
    den = torch.zeros_like(params[0])
    for w, p, f in zip(_weights(weights, len(params)), params, fishers, strict=True):
        fw = (f.to(p.dtype) + eps) * w
        num.add_(fw * p)
        den.add_(fw)
    if bool((den == 0).any()):
        raise ValueError("fisher_merge: zero total Fisher weight on some entries; use eps > 0")
    return num / den


def regmean(
    params: Sequence[torch.Tensor],
    grams: Iterable[torch.Tensor],
    reduce_non_diagonal_ratio: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """W* = ((sum_k w_k G~_k)^-1 sum_k w_k G~_k W_k^T)^T for linear weights W_k in torch's (out, in) layout.

    RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    arXiv:2212.09849): with G_k the Gram matrix X_k^T X_k of the layer's inputs in model k, W* minimises
    sum_k w_k ||X_k W^T - X_k W_k^T||^2 (the merged layer reproduces each model's outputs on its own
    inputs). G~_k = a G_k + (1 - a) diag(G_k), a = ``reduce_non_diagonal_ratio`` (the paper's alpha): the
    off-diagonal entries scaled by a, which regularises towards the (Gram-weighted) mean. ``grams`` is
    consumed one at a time (it may be a generator reading them lazily). Solved in float64 by Cholesky
    (the summed Gram is symmetric positive semi-definite), never by an explicit inverse; a system that is
    singular to the precision of the Gram matrices (a Cholesky pivot <= eps x its largest diagonal entry,
    eps of the Grams' dtype) raises.
    """
    _check_same_shape(params, "params")
    if params[0].dim() != 2:
        raise ValueError(f"regmean: expected 2-D (out, in) weights, got shape {tuple(params[0].shape)}")
    _check_fraction(reduce_non_diagonal_ratio, "reduce_non_diagonal_ratio")
    w = _weights(weights, len(params))
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"regmean: weights must be >= 0 with a positive sum, got {w}")
    out_features, in_features = params[0].shape
    lhs = torch.zeros(in_features, in_features, dtype=torch.float64, device=params[0].device)
    rhs = torch.zeros(in_features, out_features, dtype=torch.float64, device=params[0].device)
    eps = 0.0
    for k, (wk, p, g) in enumerate(zip(w, params, grams, strict=True)):
        if tuple(g.shape) != (in_features, in_features):
            raise ValueError(
                f"regmean: grams[{k}] has shape {tuple(g.shape)}, expected ({in_features}, {in_features}) "
                f"for a ({out_features}, {in_features}) weight"
            )
        eps = max(eps, torch.finfo(g.dtype).eps)
        g = g.to(torch.float64, copy=True)
        diagonal = g.diagonal().clone()
        g.mul_(reduce_non_diagonal_ratio).diagonal().copy_(diagonal)
        g.mul_(wk)
        lhs.add_(g)
        rhs.addmm_(g, p.to(torch.float64).T)
        del g, diagonal
    scale = float(lhs.diagonal().max())
    chol, info = torch.linalg.cholesky_ex(lhs)
    del lhs
    if int(info) > 0 or float(chol.diagonal().square().min()) <= eps * scale:
        raise ValueError(
            f"regmean: the summed ({in_features} x {in_features}) Gram matrix is singular to the precision "
            f"of the Gram matrices (eps {eps:.1e}): some input directions were (almost) never seen. Use "
            "reduce_non_diagonal_ratio < 1 (it keeps each Gram's diagonal), more data for the Grams, or "
            "send the tensor to another method with an override (an input feature that is zero on all "
            "the data stays singular)"
        )
    return torch.cholesky_solve(rhs, chol).T.to(params[0].dtype).contiguous()


def tall_masks(deltas: Sequence[torch.Tensor], lambda_: float | Sequence[float] = 0.6) -> list[torch.Tensor]:
    """m_t = 1{|tau_t| >= lambda_t * |tau_MTL - tau_t|}, tau_MTL = sum_t tau_t: TALL masks (Wang et al., 2024,
    "Localizing Task Information for Improved Model Merging and Compression").

    Entry j of task t is kept where that task's delta dominates the other tasks' sum. Returns boolean masks.
    """
    _check_same_shape(deltas)
    lambdas = _per_input(lambda_, len(deltas), "lambda_")
    mtl = task_arithmetic(deltas)
    return [d.abs() >= lam * (mtl - d).abs() for d, lam in zip(deltas, lambdas, strict=True)]


def consensus_mask(
    deltas: Sequence[torch.Tensor], k: int = 2, lambda_: float | Sequence[float] = 0.6
) -> torch.Tensor:
    """m_cons = 1{sum_t m_t >= k}: keep entries that at least k TALL masks select (Wang et al., 2024).

    k = 2 removes "selfish" weights (used by one task only) and "catastrophic" ones (used by none).
    """
    if k < 0 or int(k) != k:
        raise ValueError(f"k must be a non-negative integer, got {k}")
    masks = tall_masks(deltas, lambda_)
    votes = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        votes += m
    return votes >= k


def consensus_merge(
    deltas: Sequence[torch.Tensor],
    k: int = 2,
    lambda_: float | Sequence[float] = 0.6,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """tau = m_cons * sum_i w_i tau_i: consensus task arithmetic (Wang et al., 2024)."""
    return task_arithmetic(deltas, weights) * consensus_mask(deltas, k, lambda_).to(deltas[0].dtype)


def tall_compress(
    deltas: Sequence[torch.Tensor], lambda_: float | Sequence[float] = 0.6
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tau_MTL, [m_t]): TALL-mask compression of T task vectors into one multi-task vector tau_MTL = sum_t
    tau_t and one boolean mask per task (:func:`tall_masks`; Wang et al., 2024, Sec. 3.1 and 4.1): task t
    is recovered as theta_0 + m_t * tau_MTL (:func:`tall_reconstruct`) without storing tau_t."""
    return task_arithmetic(deltas), tall_masks(deltas, lambda_)


def tall_reconstruct(base: torch.Tensor, mtl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """theta_t = theta_0 + m_t * tau_MTL: one task's weights recovered from a TALL compression (computed in
    the wider of the dtypes, returned in the base's dtype)."""
    _check_same_shape([base, mtl, mask], "base, mtl, mask")
    dtype = compute_dtype(base.dtype, mtl.dtype)
    out = base.to(dtype) + torch.where(mask.bool(), mtl.to(dtype), torch.zeros((), dtype=dtype))
    return out.to(base.dtype)


_BITS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)  # bit k of a byte holds entry 8j + k


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as 1-D uint8, 8 entries per byte (flattened entry 8j+k in bit k of byte j, the
    last byte zero-padded): ``numpy.packbits(mask, bitorder="little")``, so a mask costs 1 bit per entry."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask: expected a boolean mask, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_mask` packed into ``packed`` (uint8, 1-D)."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"unpack_mask: expected {(numel + 7) // 8} uint8 bytes for shape {tuple(shape)}, "
                         f"got "
                         f"{packed.dtype} of shape {tuple(packed.shape)}")
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))


def sce(deltas: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Wan et al., 2024, "FuseChat"): Select the top ``select_topk`` fraction of entries by variance
    across the task vectors (of those with non-zero variance), Calculate w_i = mean(tau_i^2) / sum_j
    mean(tau_j^2) on the selected entries, Erase entries whose sign disagrees with sgn(sum_i tau_i), and
    return sum_i w_i m_i tau_i / sum_i w_i m_i (0 where nothing agrees).

    As mergekit's ``sce``: k = floor(select_topk * #nonzero variances), the weights are uniform when
    sum_j mean(tau_j^2) < 1e-6, and the denominator is clamped at 1e-6 from below.
    """
    _check_same_shape(deltas)
    if not 0.0 <= select_topk <= 1.0:
        raise ValueError(f"select_topk must be in [0, 1], got {select_topk}")
    deltas = list(deltas)
    if select_topk < 1:
        var = torch.var(torch.stack(deltas), dim=0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        keep = top_k_mask(var, k, largest=True).view_as(deltas[0])
        deltas = [d * keep for d in deltas]
    energy = [float(d.square().mean()) if d.numel() else 0.0 for d in deltas]
    total = sum(energy)
    w = [1.0 / len(deltas)] * len(deltas) if abs(total) < 1e-6 else [e / total for e in energy]
    sign = elect_sign(deltas)
    num = disjoint_mean(deltas, sign, w, normalize=False)
    positive = sign > 0
    den = torch.zeros_like(deltas[0])
    for wi, d in zip(w, deltas, strict=True):
        den.add_(torch.where(positive, d > 0, d < 0), alpha=wi)
    return num.div_(den.clamp_(min=1e-6))


def ram(deltas: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM (Reinforced Agent Merging, arXiv:2601.13572): the mean over the task vectors whose entry exceeds
    ``epsilon`` in magnitude, sum_i tau_i 1{|tau_i| > eps} / max(1, #{i: |tau_i| > eps}); 0 where none does.

    Unlike an average, an update only one model made is kept at full size instead of divided by N.
    """
    _check_same_shape(deltas)
    active = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    for a in active:
        count.add_(a)
    count.clamp_(min=1)
    out = torch.zeros_like(deltas[0])
    for d, a in zip(deltas, active, strict=True):
        out.add_((d * a).div_(count))
    return out


def ramplus_tl(
    deltas: Sequence[torch.Tensor], epsilon: float = 1e-5, r: float = 0.1, alpha: float = 0.2
) -> torch.Tensor:
    """RAM+ (tensor-local; arXiv:2601.13572, as mergekit's ``ramplus_tl``): :func:`ram`, but the entries only
    model i updated are scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha), rho_i = (#entries i shares
    with another model) / max(#entries only i updated, epsilon), counted in this tensor.
    """
    _check_same_shape(deltas)
    active = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(deltas[0].shape, dtype=deltas[0].dtype, device=deltas[0].device)
    for a in active:
        count.add_(a)
    unique = count == 1
    count.clamp_(min=1)
    out = torch.zeros_like(deltas[0])
    for d, a in zip(deltas, active, strict=True):
        own = a & unique
        n_unique, n_shared = int(own.sum()), int((a & ~unique).sum())
        lam = 1 + r * min(max(n_shared / max(n_unique, epsilon), 0.0), alpha)
        kept = (d * a).div_(count)  # count is 1 on the entries only this model updated
        kept[own] *= lam
        out.add_(kept)
    return out


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    """theta = w model + (1 - w) base, w = clamp(t / max(|model - base|, 1e-6), 0, 1), elementwise.

    NearSwap (alchemonaut, as mergekit's ``nearswap``): take the model's value where it is within ``t`` of
    the base, move only t towards it where they differ more.
    """
    _check_same_shape([base, model], "base+model")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    weight = (t / (model - base).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return weight * model + (1 - weight) * base


def _quantile_floor(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The floor(q (n - 1))-th smallest entry (0-based) of a flat tensor: a quantile without interpolation."""
    index = math.floor(q * (flat.numel() - 1))
    return torch.kthvalue(flat, index + 1).values


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion (Arcee AI, as mergekit's ``arcee_fusion``): take the model's entry where its importance
    s = |model - base| * KL(softmax(model) || softmax(base)) (softmax and KL along the last dim, +1e-8)
    reaches median(s) + 1.5 IQR(s), else the base's.

    Quantiles are exact order statistics floor(q (n - 1)); mergekit samples 10^6 entries (with replacement,
    from its global random state) of tensors larger than that, so there the two differ slightly.
    """
    _check_same_shape([base, model], "base+model")
    p = torch.softmax(model, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    importance = (model - base).abs_().mul_(kl)
    flat = importance.reshape(-1)
    q1, median, q3 = (_quantile_floor(flat, x) for x in (0.25, 0.5, 0.75))
    keep = importance >= median + 1.5 * (q3 - q1)
    return torch.where(keep, model, base)


# -- SVD merges of FusionBench (issue 16): TSV-M, Iso-C, Iso-CTS --------------------------------------------
# Per 2-D tensor (a layer's task matrix); any other tensor gets the mean of its task vectors, as FusionBench.
# The SVDs run in float32 (float64 inputs in float64) and the result comes back in the inputs' dtype.


def _numerical_rank(s: torch.Tensor, shape: Sequence[int]) -> int:
    """Number of singular values above max(m, n) eps(dtype) sigma_max (numpy's ``matrix_rank`` tolerance)."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum())


def _polar(x: torch.Tensor) -> torch.Tensor:
    """P Q^T for x = P S Q^T: the matrix with orthonormal columns (rows if x is wide) nearest to x in
    Frobenius norm: the orthogonal Procrustes solution (TSV-M's and Iso-CTS's decorrelation)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def _reassemble(us: list[torch.Tensor], s: torch.Tensor, vhs: list[torch.Tensor]) -> torch.Tensor:
    """polar([U_1 ... U_T]) diag(s) polar([V_1 ... V_T]^T): stacked bases decorrelated, reassembled (the
    lists are emptied as they are stacked, so only one copy of each basis is alive)."""
    u = torch.cat(us, dim=1)
    us.clear()
    u = _polar(u).mul_(s)
    vh = torch.cat(vhs, dim=0)
    vhs.clear()
    return u @ _polar(vh)


def tsv_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    sv_reduction: float | None = None,
) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging", arXiv:2412.00081): per 2-D task matrix w_i tau_i = U_i S_i V_i^T keep the top k = floor(f r)
    singular triplets (r = min(m, n), f = ``sv_reduction``, default 1/T as the paper), stack
    U = [U_1,k ... U_T,k], S = diag(S_1,k ... S_T,k), V = [V_1,k ... V_T,k], decorrelate both bases by
    orthogonal Procrustes (U_perp = P_U Q_U^T from U = P_U Sigma_U Q_U^T, likewise V_perp) and return
    U_perp S V_perp^T.

    Other tensors: sum_i w_i tau_i / T (FusionBench's mean). f T <= 1 keeps the stacked bases at most r wide.
    One task with f = 1 returns the task vector itself. A task matrix of rank below k contributes its nonzero
    triplets only (numerical rank, numpy's tolerance): the others are an arbitrary null-space basis, so
    keeping them (as FusionBench does) makes the merge of low-rank task matrices such as LoRA deltas depend on
    rounding noise; on full-rank matrices nothing changes.
    """
    _check_same_shape(deltas)
    n_tasks = len(deltas)
    w = _weights(weights, n_tasks)
    if deltas[0].dim() != 2:
        return task_arithmetic(deltas, w) / n_tasks
    fraction = 1.0 / n_tasks if sv_reduction is None else float(sv_reduction)
    if not 0.0 < fraction * n_tasks <= 1.0 + 1e-12:
        raise ValueError(
            f"sv_reduction must be in (0, 1/T] = (0, {1 / n_tasks:g}] for T={n_tasks} task vectors, "
            f"got {fraction}"
        )
    dtype = compute_dtype(deltas[0].dtype)
    k = int(min(deltas[0].shape) * fraction)
    if k == 0:  # a task matrix thinner than T: no singular component survives (as FusionBench)
        return torch.zeros_like(deltas[0])
    us, ss, vhs = [], [], []
    for wi, d in zip(w, deltas, strict=True):
        u, s, vh = torch.linalg.svd(d.to(dtype) * wi, full_matrices=False)
        # a triplet with sigma = 0 is not part of tau_i (its vectors are LAPACK's arbitrary basis of the null
        # space, which the Procrustes step would mix into every other vector): keep the numerically nonzero
        # ones only, so low-rank task matrices (LoRA deltas) have a well-defined merge
        ki = min(k, _numerical_rank(s, d.shape))
        # copies, not views: a view of the first k columns would keep the whole factor alive
        us.append(u[:, :ki].clone())
        ss.append(s[:ki].clone())
        vhs.append(vh[:ki].clone())
        del u, s, vh
    if not any(len(x) for x in ss):  # every task matrix is zero
        return torch.zeros_like(deltas[0])
    return _reassemble(us, torch.cat(ss), vhs).to(deltas[0].dtype)


def iso_c(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", arXiv:2502.04959): for the summed task matrix sum_i w_i tau_i = U S V^T return
    sigma_bar U V^T, sigma_bar = (1/r) sum_j sigma_j (r = min(m, n)): the same subspace with a flat spectrum.

    Other tensors: sum_i w_i tau_i / T (FusionBench's mean).
    """
    _check_same_shape(deltas)
    total = task_arithmetic(deltas, weights)
    if total.dim() != 2:
        return total / len(deltas)
    u, s, vh = torch.linalg.svd(total.to(compute_dtype(total.dtype)), full_matrices=False)
    return (u.mul_(s.mean()) @ vh).to(total.dtype)


def iso_cts_sizes(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k_common, k_task): k_task = round((r - floor(f r)) / T) (at most floor(r / T)) singular directions
    per task and k_common = r - T k_task for the common subspace, so that both fill the r dimensions."""
    k_task = min(round((r - int(r * common_space_fraction)) / n_tasks), r // n_tasks)
    return r - n_tasks * k_task, k_task


def iso_cts(
    deltas: Sequence[torch.Tensor],
    common_space_fraction: float = 0.8,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025, arXiv:2502.04959): the top k_c left/right singular vectors of
    the summed task matrix sum_i w_i tau_i = U S V^T span the common subspace; each task adds the top k_t
    singular triplets of its residual w_i tau_i - U_c U_c^T w_i tau_i (sizes: :func:`iso_cts_sizes`,
    together r); both stacked bases are orthogonalised by Procrustes (U_perp = P Q^T, as :func:`tsv_merge`)
    and the spectrum is made isotropic: sigma_bar U_perp V_perp^T, sigma_bar the mean of the r kept
    singular values.

    Other tensors: sum_i w_i tau_i / T (FusionBench's mean). ``common_space_fraction = 1`` is Iso-C.
    """
    _check_same_shape(deltas)
    _check_fraction(common_space_fraction, "common_space_fraction")
    n_tasks = len(deltas)
    w = _weights(weights, n_tasks)
    total = task_arithmetic(deltas, w)
    if total.dim() != 2:
        return total / n_tasks
    dtype = compute_dtype(total.dtype)
    k_common, k_task = iso_cts_sizes(min(total.shape), n_tasks, common_space_fraction)
    u, s, vh = torch.linalg.svd(total.to(dtype), full_matrices=False)
    del total
    u_common = u[:, :k_common].clone()
    us, ss, vhs = [u_common], [s[:k_common].clone()], [vh[:k_common].clone()]
    del u, s, vh
    for wi, d in zip(w, deltas, strict=True):
        scaled = d.to(dtype) * wi
        residual = scaled.sub_(u_common @ (u_common.T @ scaled))
        ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
        us.append(ut[:, :k_task].clone())
        ss.append(st[:k_task].clone())
        vhs.append(vht[:k_task].clone())
        del residual, ut, st, vht
    del u_common
    return _reassemble(us, torch.cat(ss).mean(), vhs).to(deltas[0].dtype)
