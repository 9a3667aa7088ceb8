"""Git Re-Basin weight matching as data and pure functions: permutation specs, matching costs, applying them.

Hidden units of a network can be reordered without changing its function when every tensor that reads or
writes those units is reordered alike (Ainsworth et al., "Git Re-Basin: Merging Models Modulo Permutation
Symmetries", ICLR 2023). A :class:`PermutationSpec` says, per permutation, which axes of which tensors it
acts on; :func:`matching_cost` is the weight-matching objective of one permutation with the others fixed,
C[i, j] = Σ_axes ⟨A's unit i, B's unit j⟩ (Algorithm 1); the solver that maximises tr(P·C) lives with
the checkpoints (``robustft.merge.align``) because it needs scipy. An axis may move units as blocks of
``block`` consecutive entries (a whole attention head) in each of ``outer`` stacked copies (GPT-2's fused
q|k|v): the axis is viewed as (outer, n, block) and the permutation acts on n.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "PermAxis",
    "PermutationSpec",
    "apply_permutations",
    "axis_index",
    "check_spec",
    "identity_permutations",
    "matching_cost",
    "permute_tensor",
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
