"""Exact algebra on LoRA deltas kept as factors: ΔW = scale · B @ A, never densified unless asked.

A LoRA module adds ΔW = s·B A to a frozen weight (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models"), with B of shape (out, r), A of shape (r, in) and s = lora_alpha / r.
Because ΔW is linear in the pair's product, sums, differences and scalings of deltas are again
low-rank deltas with known factors:

- ``a + b``  : rank concatenation B = [s_a B_a, s_b B_b], A = [A_a; A_b]  (exact, rank r_a + r_b)
- ``-a``     : (-B, A)                                                   (exact)
- ``c * a``  : scale c·s                                                 (exact)
- ``a.compress(k)``: best rank-k approximation (Eckart-Young) from QR of B and Aᵀ plus an SVD of the
  small r x r core, so the dense d x k matrix is never formed.

A delta may carry a bias (PEFT's ``lora_bias=True``: Δb = s·b, b the bias of ``lora_B``); it follows the
same linear algebra (sums, negation, scaling) and is never truncated.

Beside it, :func:`paper_add` / :func:`paper_negate` implement the parameter-space operators of Zhang
et al. 2023, "Composing Parameter-Efficient Modules with Arithmetic Operations" (NeurIPS), which add
the factors themselves (A = Σ λ_i A_i, B = Σ λ_i B_i, so ΔW gets cross terms) and negate a LoRA
module by negating B only.

Everything here is pure torch: no files, no PEFT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from robustft.ops.dtypes import compute_dtype

__all__ = [
    "DeltaSet",
    "LoRADelta",
    "combine",
    "combine_dense",
    "factorize",
    "paper_add",
    "paper_negate",
    "relative_tail",
]


def _sum_bias(biases: Sequence[torch.Tensor | None], weights: Sequence[float] | None = None):
    """Σ w_i b_i over the biases that exist (a missing one is zero); None when none exists."""
    weights = [1.0] * len(biases) if weights is None else weights
    terms = [(w, b) for w, b in zip(weights, biases, strict=True) if b is not None]
    if not terms:
        return None
    dtype = terms[0][1].dtype
    for _, b in terms[1:]:
        dtype = torch.promote_types(dtype, b.dtype)
    return sum(w * b.to(dtype) for w, b in terms)


def relative_tail(singular_values: torch.Tensor, rank: int) -> float:
    """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(Σ_{i>k} σ_i²) / √(Σ σ_i²): the relative error of the best rank-k
    approximation (Eckart-Young), from the singular values; 0 for a zero matrix."""
    energy = singular_values.double().square()
    total = float(energy.sum())
    return math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0


@dataclass(frozen=True, eq=False)
class LoRADelta:
    """ΔW = scale · B @ A for one module; B: (out, r), A: (r, in); with ``bias``, also Δb = scale · bias.

    Args:
        B: up-projection factor, shape (out, r).
        A: down-projection factor, shape (r, in).
        scale: the scalar s (PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
        name: module name, only used in error messages.
        bias: the bias of ``lora_B`` (PEFT ``lora_bias=True``), shape (out,), or None.
    """

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0
    name: str = "<delta>"
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.B.ndim != 2 or self.A.ndim != 2:
            raise ValueError(
                f"{self.name}: LoRA factors must be 2-D, "
                f"got B {tuple(self.B.shape)} and A {tuple(self.A.shape)}"
            )
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"{self.name}: rank mismatch between B {tuple(self.B.shape)} and A {tuple(self.A.shape)}"
            )
        if not torch.is_floating_point(self.B) or not torch.is_floating_point(self.A):
            raise ValueError(f"{self.name}: LoRA factors must be floating point")
        if self.bias is not None and (
            tuple(self.bias.shape) != (self.B.shape[0],) or not torch.is_floating_point(self.bias)
        ):
            raise ValueError(
                f"{self.name}: the LoRA bias must be a floating-point vector of B's {self.B.shape[0]} rows, "
                f"got {tuple(self.bias.shape)}"
            )

    # -- shape ------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the dense ΔW, (out, in)."""
        return self.B.shape[0], self.A.shape[1]

    # -- exact algebra ----------------------------------------------------------------------------
    def folded(self) -> LoRADelta:
        """The same ΔW (and Δb) with the scale folded into B (and the bias): (s·B, A, 1)."""
        if self.scale == 1.0:
            return self
        bias = None if self.bias is None else self.bias * self.scale
        return LoRADelta(self.B * self.scale, self.A, 1.0, self.name, bias)

    def __add__(self, other: LoRADelta) -> LoRADelta:
        """ΔW_a + ΔW_b = [s_a B_a, s_b B_b] @ [A_a; A_b] (rank concatenation, exact); Δb_a + Δb_b."""
        if not isinstance(other, LoRADelta):
            return NotImplemented
        if self.shape != other.shape:
            raise ValueError(
                f"{self.name}: cannot add LoRA deltas of shapes {self.shape} and {other.shape} ({other.name})"
            )
        a, b = self.folded(), other.folded()
        dtype = torch.promote_types(a.B.dtype, b.B.dtype)
        B = torch.cat([a.B.to(dtype), b.B.to(dtype)], dim=1)
        A = torch.cat([a.A.to(dtype), b.A.to(dtype)], dim=0)
        return LoRADelta(B, A, 1.0, self.name, _sum_bias([a.bias, b.bias]))

    def __neg__(self) -> LoRADelta:
        """-ΔW = (-B) @ A (and -Δb)."""
        bias = None if self.bias is None else -self.bias
        return LoRADelta(-self.B, self.A, self.scale, self.name, bias)

    def __sub__(self, other: LoRADelta) -> LoRADelta:
        return self + (-other)

    def __mul__(self, c: float) -> LoRADelta:
        """c·ΔW = (c·s) · B @ A (the bias follows the scale)."""
        if isinstance(c, torch.Tensor):
            c = float(c)
        if not isinstance(c, (int, float)):
            return NotImplemented
        return LoRADelta(self.B, self.A, self.scale * float(c), self.name, self.bias)

    __rmul__ = __mul__

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ΔW = s·B @ A, shape (out, in); only on request, it costs out x in memory."""
        dt = dtype or compute_dtype(self.B.dtype, self.A.dtype)
        return (self.B.to(dt) @ self.A.to(dt)) * self.scale

    def dense_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Δb = s·bias, shape (out,), or None without a LoRA bias."""
        if self.bias is None:
            return None
        return self.bias.to(dtype or compute_dtype(self.B.dtype, self.A.dtype, self.bias.dtype)) * self.scale

    # -- compression ------------------------------------------------------------------------------
    def _core_svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = compute_dtype(self.B.dtype, self.A.dtype)
        Qb, Rb = torch.linalg.qr(self.B.to(dt))  # B = Qb Rb
        Qa, Ra = torch.linalg.qr(self.A.to(dt).T)  # Aᵀ = Qa Ra
        core = (Rb @ Ra.T) * self.scale  # ΔW = Qb core Qaᵀ, core is at most r x r
        U, S, Vh = torch.linalg.svd(core, full_matrices=False)
        return Qb, Qa, U, S, Vh

    def singular_values(self) -> torch.Tensor:
        """Singular values of ΔW from the factors alone (QR + SVD of the r x r core)."""
        return self._core_svd()[3]

    def truncation_error(self, rank: int) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F of :meth:`compress` (``rank``), from the factors alone."""
        return relative_tail(self.singular_values(), rank)

    def compress(self, rank: int) -> LoRADelta:
        """Best rank-k approximation of ΔW: ΔW_k = Σ_{i≤k} σ_i u_i v_iᵀ (Eckart-Young), from the factors.

        With B = Q_b R_b and Aᵀ = Q_a R_a, ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ; the SVD of the small core
        U Σ Vᵀ gives ΔW's singular triplets (Q_b U, Σ, Q_a V). The result keeps √σ on each side,
        scale 1. Exact (up to rounding) when ``rank`` ≥ the true rank of ΔW. Cost
        O((out + in)·r² + r³) instead of O(out·in·min(out, in)) for a dense SVD. A bias is kept exactly.
        """
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{self.name}: compress rank must be a positive integer, got {rank!r}")
        Qb, Qa, U, S, Vh = self._core_svd()
        k = min(rank, S.shape[0])
        root = S[:k].sqrt()
        B = (Qb @ U[:, :k]) * root
        A = root[:, None] * (Vh[:k] @ Qa.T)
        dtype = torch.promote_types(self.B.dtype, self.A.dtype)
        return LoRADelta(B.to(dtype), A.to(dtype), 1.0, self.name, self.folded().bias)


def paper_add(deltas: Sequence[LoRADelta], weights: Sequence[float] | None = None) -> LoRADelta:
    """θ_add = Σ_i λ_i θ_i on the factors: B = Σ λ_i B_i, A = Σ λ_i A_i (so ΔW = s·B A has cross terms).

    The addition operator of Zhang et al. 2023, "Composing Parameter-Efficient Modules with
    Arithmetic Operations" (their λθ₁ + (1-λ)θ₂ is ``weights=[λ, 1-λ]``). It is defined on modules
    of one architecture: all ranks and scales must be equal. Not the sum of the ΔW's; see
    :meth:`LoRADelta.__add__` for the exact one.
    """
    deltas = list(deltas)
    if not deltas:
        raise ValueError("paper_add: no deltas given")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise ValueError(f"paper_add: {len(weights)} weights for {len(deltas)} deltas")
    first = deltas[0]
    for d in deltas[1:]:
        if d.B.shape != first.B.shape or d.A.shape != first.A.shape:
            raise ValueError(
                f"{first.name}: the paper's addition needs equal factor shapes, "
                f"got B {tuple(first.B.shape)}, A {tuple(first.A.shape)} "
                f"and B {tuple(d.B.shape)}, A {tuple(d.A.shape)}"
            )
        if d.scale != first.scale:
            raise ValueError(
                f"{first.name}: the paper's addition needs equal LoRA scales (lora_alpha/r), "
                f"got {first.scale} and {d.scale}"
            )
    B = sum(w * d.B for w, d in zip(weights, deltas, strict=True))
    A = sum(w * d.A for w, d in zip(weights, deltas, strict=True))
    # lora_B's bias is a parameter of B: summed with it
    return LoRADelta(B, A, first.scale, first.name, _sum_bias([d.bias for d in deltas], weights))


def paper_negate(delta: LoRADelta) -> LoRADelta:
    """⊖θ = (−B, A): negate the up-projection only, so ΔW becomes −ΔW.

    The LoRA negation operator of Zhang et al. 2023 ("Composing Parameter-Efficient Modules with
    Arithmetic Operations"; their released code negates ``lora_B`` and keeps ``lora_A``). For ΔW it
    coincides with the exact negation; it differs from negating every parameter, which would leave
    ΔW = (−B)(−A) unchanged. A ``lora_B`` bias is negated with B.
    """
    return -delta


class DeltaSet(dict):
    """Module name -> :class:`LoRADelta` for a whole adapter, with the same exact algebra.

    A module present in one operand only is combined with zero there, so adapters with different
    target modules add up exactly.
    """

    def __add__(self, other: DeltaSet) -> DeltaSet:
        if not isinstance(other, Mapping):
            return NotImplemented
        out = DeltaSet(self)
        for name, d in other.items():
            out[name] = out[name] + d if name in out else d
        return out

    def __neg__(self) -> DeltaSet:
        return DeltaSet({n: -d for n, d in self.items()})

    def __sub__(self, other: DeltaSet) -> DeltaSet:
        return self + (-DeltaSet(other))

    def __mul__(self, c: float) -> DeltaSet:
        return DeltaSet({n: d * c for n, d in self.items()})

    __rmul__ = __mul__

    def compress(self, rank: int) -> DeltaSet:
        """Best rank-``rank`` approximation of every module's ΔW (see :meth:`LoRADelta.compress`)."""
        return DeltaSet({n: d.compress(rank) for n, d in self.items()})

    def folded(self) -> DeltaSet:
        """Every delta with its scale folded into B (scale 1)."""
        return DeltaSet({n: d.folded() for n, d in self.items()})

    def dense(self) -> dict[str, torch.Tensor]:
        """Module name -> dense ΔW (out, in); only on request."""
        return {n: d.dense() for n, d in self.items()}


def combine(
    sets: Sequence[Mapping[str, LoRADelta]],
    weights: Iterable[float] | None = None,
    method: str = "exact",
) -> DeltaSet:
    """ΔW = Σ_i w_i ΔW_i per module (``method="exact"``), or Zhang et al. 2023's factor sum (``"paper"``).

    ``exact`` concatenates ranks, so the result's ΔW is the weighted sum to rounding; a module
    missing from an input counts as zero. ``paper`` adds w_i·A_i and w_i·B_i (negative weights
    negate B only, as the paper's negation), with missing modules as zero factors; it needs
    equal ranks and scales per module.
    """
    sets = list(sets)
    if not sets:
        raise ValueError("combine: no adapters given")
    weights = [1.0] * len(sets) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sets):
        raise ValueError(f"combine: {len(weights)} weights for {len(sets)} adapters")
    if method == "exact":
        out = DeltaSet()
        for w, s in zip(weights, sets, strict=True):
            out = out + DeltaSet(s) * w
        return out.folded()
    if method == "paper":
        names = sorted(set().union(*[s.keys() for s in sets]))
        out = DeltaSet()
        for name in names:
            present = [(w, s[name]) for w, s in zip(weights, sets, strict=True) if name in s]
            # the paper's λ·θ: |λ| on the factors, and a negative λ applies ⊖ (negate B only)
            terms = [paper_negate(d) if w < 0 else d for w, d in present]
            out[name] = paper_add(terms, [abs(w) for w, _ in present])
        return out
    raise ValueError(f"combine: unknown method {method!r}; expected 'exact' or 'paper'")


def _truncated_svd(
    dense: torch.Tensor, rank: int, name: str, bias: torch.Tensor | None = None
) -> tuple[LoRADelta, float]:
    """(best rank-k factors of ``dense``, their relative Frobenius error), from one SVD."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    U, S, Vh = torch.linalg.svd(dense.to(compute_dtype(dense.dtype)), full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    B, A = (U[:, :k] * root).to(dense.dtype), (root[:, None] * Vh[:k]).to(dense.dtype)
    return LoRADelta(B, A, 1.0, name, bias), relative_tail(S, k)


def factorize(dense: torch.Tensor, rank: int, name: str = "<delta>") -> LoRADelta:
    """Best rank-k factors of a dense ΔW: B = U_k √Σ_k, A = √Σ_k V_kᵀ (truncated SVD, Eckart-Young)."""
    return _truncated_svd(dense, rank, name)[0]


def combine_dense(
    sets: Sequence[Mapping[str, LoRADelta]],
    merge_fn: Callable[[list[torch.Tensor], list[float], str], torch.Tensor],
    rank: int,
    weights: Iterable[float] | None = None,
    progress: bool | None = None,
) -> tuple[DeltaSet, dict[str, float]]:
    """ΔW = factorize(merge_fn([ΔW_1, ..., ΔW_n], w, name), rank) per module, for merges that are not
    linear; returns the merged factors and, per module, ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the truncation.

    TIES, DARE and other element-wise merges need the dense ΔW_i (a module missing from an input
    is a zero matrix there); the merged matrix is brought back to LoRA factors by a truncated SVD,
    so the result is the best rank-``rank`` approximation of the merge. One module at a time is
    densified, never the whole adapter. ``name`` is ``<module>.weight``; LoRA biases (Δb_i, zero
    where an input has none) are merged by the same ``merge_fn`` as ``<module>.bias`` and kept exactly.
    ``progress``: a tqdm bar over the modules (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    sets = list(sets)
    if not sets:
        raise ValueError("combine_dense: no adapters given")
    weights = [1.0] * len(sets) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sets):
        raise ValueError(f"combine_dense: {len(weights)} weights for {len(sets)} adapters")
    names = sorted(set().union(*[s.keys() for s in sets]))
    out, errors = DeltaSet(), {}
    disable = None if progress is None else not progress
    for name in tqdm(names, desc="merging LoRA modules", unit="module", disable=disable):
        present = [s[name] for s in sets if name in s]
        dtype, shape = compute_dtype(*[t.dtype for d in present for t in (d.B, d.A)]), present[0].shape
        dense = [s[name].dense(dtype) if name in s else torch.zeros(shape, dtype=dtype) for s in sets]
        merged = merge_fn(dense, weights, f"{name}.weight")
        del dense
        bias = None
        if any(d.bias is not None for d in present):
            biases = [
                s[name].dense_bias(dtype)
                if name in s and s[name].bias is not None
                else torch.zeros(shape[0], dtype=dtype)
                for s in sets
            ]
            bias = merge_fn(biases, weights, f"{name}.bias")
        out[name], errors[name] = _truncated_svd(merged, rank, name, bias)
    return out, errors
