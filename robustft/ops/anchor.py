"""Anchor penalties that keep fine-tuning near its start: L2-SP, the Fisher (EWC) anchor, spectral.

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
    "spectral_penalty",
    "top_singular_value",
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
