"""Git Re-Basin weight matching as data and pure functions: permutation specs, matching costs, applying them.

Hidden units of a network can be reordered without changing its function when every tensor that reads or
writes those units is reordered alike (Ainsworth et al., "Git Re-Basin: Merging Models Modulo Permutation
Symmetries", ICLR 2023). A :class:`PermutationSpec` says, per permutation, which axes of which tensors it
acts on; :func:`matching_cost` is the weight-matching objective of one permutation with the others fixed,
C[i, j] = Σ_axes ⟨A's unit i, B's unit j⟩ (Algorithm 1); the solver that maximises tr(P·C) lives with
the checkpoints (``robustft.merge.align``) because it needs scipy. An axis may move units as blocks of
``block`` consecutive entries (a whole attention head) in each of ``outer`` stacked copies (GPT-2's fused
q|k|v): the axis is viewed as (outer, n, block) and the permutation acts on n.

Activation matching (Sec. 3.1 of the paper) compares units by what they compute instead: the Pearson
correlation of the two models' activations on the same inputs (:class:`CrossMoments`, accumulated batch by
batch; a unit of ``block`` entries sums the correlations of its entries). :func:`loss_barrier` is the paper's
barrier of a loss curve along the linear path θ(λ) = (1−λ)·θ_A + λ·θ_B (Sec. 2, Definition 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "CrossMoments",
    "PermAxis",
    "PermutationSpec",
    "apply_permutations",
    "axis_index",
    "check_spec",
    "identity_permutations",
    "loss_barrier",
    "matching_cost",
    "permute_tensor",
    "unit_activations",
]


@dataclass(frozen=True)
class PermAxis:
    """Axis ``dim`` of tensor ``tensor``, seen as (outer, n, block); a permutation of n moves whole blocks."""

    tensor: str
    dim: int
    block: int = 1
    outer: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes each permutation acts on: ``sizes`` name -> n, ``axes`` name -> the axes it reorders."""

    sizes: dict[str, int]
    axes: dict[str, tuple[PermAxis, ...]]

    def by_tensor(self) -> dict[str, list[tuple[str, PermAxis]]]:
        """tensor name -> the (permutation, axis) pairs acting on it."""
        out: dict[str, list[tuple[str, PermAxis]]] = {}
        for name, axes in self.axes.items():
            for axis in axes:
                out.setdefault(axis.tensor, []).append((name, axis))
        return out


def check_spec(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every axis exists and has outer·n·block entries, and no axis is claimed twice; else a ValueError."""
    if set(spec.sizes) != set(spec.axes):
        raise ValueError(f"permutation spec: sizes {sorted(spec.sizes)} and axes {sorted(spec.axes)} differ")
    seen: dict[tuple[str, int], str] = {}
    for name, axes in spec.axes.items():
        n = spec.sizes[name]
        for axis in axes:
            if axis.tensor not in shapes:
                raise ValueError(f"permutation {name!r}: no tensor {axis.tensor!r}")
            shape = tuple(shapes[axis.tensor])
            if not 0 <= axis.dim < len(shape):
                raise ValueError(
                    f"permutation {name!r}: tensor {axis.tensor!r} {shape} has no dim {axis.dim}"
                )
            if shape[axis.dim] != axis.outer * n * axis.block:
                raise ValueError(
                    f"permutation {name!r}: tensor {axis.tensor!r} dim {axis.dim} has {shape[axis.dim]} "
                    f"entries, expected {axis.outer}·{n}·{axis.block}"
                )
            key = (axis.tensor, axis.dim)
            if key in seen:
                raise ValueError(
                    f"tensor {axis.tensor!r} dim {axis.dim} is reordered by both {seen[key]!r} and {name!r}"
                )
            seen[key] = name


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Every permutation of the spec as the identity (int64 index tensors)."""
    return {name: torch.arange(n) for name, n in spec.sizes.items()}


def axis_index(perm: torch.Tensor, block: int = 1, outer: int = 1) -> torch.Tensor:
    """The element index of an outer·n·block axis reordered by ``perm`` (new unit i = old unit perm[i])."""
    n = perm.numel()
    units = (perm.long()[:, None] * block + torch.arange(block)).reshape(-1)
    return (torch.arange(outer)[:, None] * (n * block) + units).reshape(-1)


def permute_tensor(w: torch.Tensor, moves: list[tuple[torch.Tensor, PermAxis]]) -> torch.Tensor:
    """``w`` with each listed axis reordered by its permutation (an exact gather: no arithmetic)."""
    for perm, axis in moves:
        w = w.index_select(axis.dim, axis_index(perm, axis.block, axis.outer))
    return w


def apply_permutations(
    spec: PermutationSpec, perms: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A copy of ``params`` with every tensor of the spec permuted; the others are passed through as is."""
    moves = spec.by_tensor()
    return {
        k: permute_tensor(v, [(perms[p], a) for p, a in moves[k]]) if k in moves else v
        for k, v in params.items()
    }


def _units(w: torch.Tensor, axis: PermAxis, n: int) -> torch.Tensor:
    """``w`` as an (n, rest) matrix whose row i holds every entry of unit i along ``axis``."""
    w = w.movedim(axis.dim, 0)
    w = w.reshape(axis.outer, n, axis.block, -1).transpose(0, 1)
    return w.reshape(n, -1)


def matching_cost(
    spec: PermutationSpec,
    name: str,
    perms: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """C[i, j] = Σ over the axes of ``name`` of ⟨reference unit i, model unit j⟩, the model's tensors
    permuted by every *other* permutation (``perms``): maximising Σ_i C[i, π(i)] is one step of weight
    matching (Ainsworth et al. 2023, Algorithm 1). Computed in float64 so ties are not made by rounding."""
    n = spec.sizes[name]
    moves = spec.by_tensor()
    cost = torch.zeros(n, n, dtype=torch.float64)
    for axis in spec.axes[name]:
        others = [(perms[p], a) for p, a in moves[axis.tensor] if a.dim != axis.dim]
        wa = reference[axis.tensor].to(torch.float64)
        wb = permute_tensor(model[axis.tensor].to(torch.float64), others)
        cost += _units(wa, axis, n) @ _units(wb, axis, n).T
    return cost


def unit_activations(x: torch.Tensor, axis: PermAxis, n: int) -> torch.Tensor:
    """The activations ``x`` (..., outer·n·block) read along ``axis`` as (samples, n, outer·block): row s,
    unit i holds every entry of unit i (its block, in each stacked copy) for sample s."""
    if x.shape[-1] != axis.outer * n * axis.block:
        raise ValueError(f"activations of {axis.tensor!r} have {x.shape[-1]} features, expected "
                         f"{axis.outer}·{n}·{axis.block}")
    x = x.reshape(-1, axis.outer, n, axis.block).transpose(1, 2)
    return x.reshape(x.shape[0], n, axis.outer * axis.block)


class CrossMoments:
    """Running sums of two models' unit activations on the same samples (float64): enough for the Pearson
    correlation of every unit of A with every unit of B, entry by entry of a unit's block."""

    def __init__(self, n: int, width: int = 1):
        z = torch.zeros(n, width, dtype=torch.float64)
        self.count = 0
        self.sa, self.sb, self.saa, self.sbb = z.clone(), z.clone(), z.clone(), z.clone()
        self.sab = torch.zeros(n, n, width, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add samples: ``a`` and ``b`` are (samples, n, width) activations of A and B on the same inputs."""
        if a.shape != b.shape or a.shape[1:] != self.sa.shape:
            raise ValueError(f"CrossMoments: activations {tuple(a.shape)} and {tuple(b.shape)}, expected "
                             f"(samples, {self.sa.shape[0]}, {self.sa.shape[1]}) for both")
        a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += torch.einsum("sik,sjk->ijk", a, b)

    def correlation(self) -> torch.Tensor:
        """C[i, j] = Σ_k corr(A unit i entry k, B unit j entry k) over the samples seen; a constant entry (no
        variance: a dead unit) correlates 0 with everything."""
        if self.count < 2:
            raise ValueError("CrossMoments: need at least 2 samples for a correlation")
        m = self.count
        ma, mb = self.sa / m, self.sb / m
        va, vb = self.saa / m - ma * ma, self.sbb / m - mb * mb
        # a variance below rounding noise of the second moment is a constant entry
        live_a, live_b = va > 1e-10 * (self.saa / m), vb > 1e-10 * (self.sbb / m)
        cov = self.sab / m - ma[:, None, :] * mb[None, :, :]
        sd = va.clamp_min(1e-300).sqrt()[:, None, :] * vb.clamp_min(1e-300).sqrt()[None, :, :]
        live = live_a[:, None, :] & live_b[None, :, :]
        return torch.where(live, cov / sd, torch.zeros((), dtype=cov.dtype)).sum(-1)


def loss_barrier(lambdas: list[float], losses: list[float]) -> float:
    """max_λ [L(θ(λ)) − ((1−λ)·L(θ_A) + λ·L(θ_B))] over the measured points (Ainsworth et al. 2023,
    Definition 1; Frankle et al. 2020): the end losses are those at λ = 0 and λ = 1 (both must be given)."""
    if len(lambdas) != len(losses) or not lambdas:
        raise ValueError(f"loss_barrier: {len(lambdas)} λ for {len(losses)} losses")
    ends = {float(x): float(v) for x, v in zip(lambdas, losses, strict=True)}
    if 0.0 not in ends or 1.0 not in ends:
        raise ValueError("loss_barrier: the curve must include λ = 0 and λ = 1 (the two models)")
    lam = torch.tensor(lambdas, dtype=torch.float64)
    line = (1 - lam) * ends[0.0] + lam * ends[1.0]
    return float((torch.tensor(losses, dtype=torch.float64) - line).max())
