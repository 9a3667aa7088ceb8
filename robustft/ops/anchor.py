"""Anchor penalties that keep fine-tuning near its start: L2-SP, the Fisher (EWC) anchor, spectral, and
the Wasserstein distance to the initial weight distribution.

Pure functions of tensors, differentiable in the live weights; ``robustft.callbacks.anchor`` adds them to the
Trainer's loss (docs/regularizers.md). Every penalty is computed in float32 (or the start copy's dtype when
wider), whatever the weights' dtype, so a bf16 model gets the same penalty as its float32 shadow would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustft.ops.dtypes import compute_dtype

__all__ = [
    "anchor_penalty",
    "anchor_pull",
    "decoupled_anchor_step_",
    "sorted_values",
    "spectral_penalty",
    "top_singular_value",
    "wasserstein_penalty",
]


def _wide(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(t.dtype, like.dtype))


def anchor_penalty(
    params: Sequence[torch.Tensor],
    starts: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """½·Σ_i w_i·(θ_i − θ_start,i)²: L2-SP (``weights=None``, w = 1) or the EWC/Fisher anchor (w = F).

    L2-SP: Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks" (ICML 2018), Ω(w) = α/2·‖w − w⁰‖²; EWC: Kirkpatrick et al. (PNAS 2017), Eq. 3,
    Σ_i λ/2·F_i(θ_i − θ*_A,i)². The gradient is w⊙(θ − θ_start); the strength λ is the caller's.
    """
    if len(params) != len(starts) or (weights is not None and len(weights) != len(params)):
        raise ValueError(f"anchor_penalty: {len(params)} tensors, {len(starts)} starts"
                         + ("" if weights is None else f", {len(weights)} weights"))
    total = None
    for i, (p, s) in enumerate(zip(params, starts)):
        d = _wide(p, s) - s.to(p.device)
        sq = d.square() if weights is None else weights[i].to(device=p.device, dtype=d.dtype) * d.square()
        total = sq.sum() if total is None else total + sq.sum()
    if total is None:
        raise ValueError("anchor_penalty: no tensor to anchor")
    return 0.5 * total


def top_singular_value(w: torch.Tensor) -> torch.Tensor:
    """σ₁ of a weight viewed as a matrix (out, in·…), differentiable (dσ₁/dW = u₁v₁ᵀ), in float32 or wider."""
    if w.ndim < 2:
        raise ValueError(f"top_singular_value: a matrix is needed, got a tensor of shape {tuple(w.shape)}")
    m = w.reshape(w.shape[0], -1)
    return torch.linalg.matrix_norm(m.to(compute_dtype(m.dtype)), ord=2)


def spectral_penalty(
    matrices: Sequence[torch.Tensor], targets: Sequence[float | torch.Tensor], power: int = 2
) -> torch.Tensor:
    """Σ_l (σ₁(W_l)^k − τ_l^k)²: the spectral regularizer of Lewandowski et al., "Learning Continually by
    Spectral Regularization" (ICLR 2025, arXiv:2406.06811, Sec. 3), which keeps each layer's largest
    singular value near its target.

    The paper's target is τ = 1 for every weight matrix, with k = 2 by default; robustft also offers
    τ_l = σ₁(W_l) at the start of training (an anchor to the pretrained spectrum). The gradient w.r.t.
    W_l is 2(σ₁^k − τ_l^k)·k·σ₁^(k−1)·u₁v₁ᵀ.
    """
    if len(matrices) != len(targets):
        raise ValueError(f"spectral_penalty: {len(matrices)} matrices for {len(targets)} targets")
    if not matrices:
        raise ValueError("spectral_penalty: no matrix to regularize")
    terms = []
    for w, tau in zip(matrices, targets):
        sigma = top_singular_value(w)
        tau = torch.as_tensor(tau, dtype=sigma.dtype, device=sigma.device)
        terms.append((sigma.pow(power) - tau.pow(power)).square())
    return torch.stack(terms).sum()


@torch.no_grad()
def anchor_pull(params: Sequence[torch.Tensor], starts: Sequence[torch.Tensor],
                factors: Sequence[float]) -> list[torch.Tensor]:
    """c·(θ − θ_start) per tensor, c = lr·λ, in float32 or wider: the decoupled L2-SP pull of θ as it is now.

    Taken on the pre-step θ and subtracted after the optimizer's update (:func:`decoupled_anchor_step_`), as
    AdamW decays the pre-step θ (Loshchilov & Hutter, 2019; ``torch.optim.AdamW`` multiplies θ by
    (1 − lr·wd) before its Adam update), but toward θ_start instead of 0.
    """
    return [c * (_wide(p, s) - s.to(p.device)) for p, s, c in zip(params, starts, factors, strict=True)]


@torch.no_grad()
def decoupled_anchor_step_(params: Sequence[torch.Tensor], pulls: Sequence[torch.Tensor]) -> None:
    """θ ← θ − pull in place, computed in the pull's dtype (float32 or wider) and rounded once to θ's."""
    for p, d in zip(params, pulls, strict=True):
        p.copy_((_wide(p, d) - d).to(p.dtype))


def sorted_values(t: torch.Tensor) -> torch.Tensor:
    """The entries of ``t`` flattened and sorted ascending, in float32 or wider: a tensor's empirical
    distribution in the form :func:`wasserstein_penalty` compares (its quantiles)."""
    return torch.sort(t.reshape(-1).to(compute_dtype(t.dtype))).values


def wasserstein_penalty(
    params: Sequence[torch.Tensor], sorted_starts: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Σ_t Σ_i (θ_t,(i) − θ⁰_t,(i))²: per tensor, the squared 2-Wasserstein distance between the empirical
    distribution of its current entries and that of its initial ones, times its size n_t.

    Two equal-size samples on the line are optimally matched in sorted order, so W₂² = (1/n)·Σ_i
    (x_(i) − y_(i))²: the Wasserstein regularizer of Lewandowski et al. ("Directions of Curvature as an
    Explanation for Loss of Plasticity", arXiv:2312.00246; the Wasserstein-to-init variant the spectral
    regularization paper compares against), which keeps each layer's weight *distribution* near its
    initial one while letting individual weights move (any permutation of θ⁰ costs nothing, unlike L2-SP).
    ``sorted_starts``: :func:`sorted_values` of the starting tensors. The gradient w.r.t. θ_j is
    2·(θ_j − θ⁰_(rank of θ_j)); torch's sort passes it back to the unsorted positions.
    """
    if len(params) != len(sorted_starts):
        raise ValueError(f"wasserstein_penalty: {len(params)} tensors, {len(sorted_starts)} starts")
    if not params:
        raise ValueError("wasserstein_penalty: no tensor to regularize")
    terms = []
    for i, (p, s) in enumerate(zip(params, sorted_starts)):
        if p.numel() != s.numel():
            raise ValueError(
                f"wasserstein_penalty: tensor {i} has {p.numel()} entries, its start {s.numel()}"
            )
        q = sorted_values(_wide(p, s))
        terms.append((q - s.to(device=q.device, dtype=q.dtype)).square().sum())
    return torch.stack(terms).sum()
