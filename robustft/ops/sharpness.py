"""Worst-case loss increase of one group of weights within a ball: the projected ascent step and the balls.

Two measures share one search, max_{δ ∈ B(w)} L(w + δ) − L(w) with δ zero outside the group, by projected
gradient ascent (:func:`ascent_step`) from δ = 0:

* ``"relative_l2"``: B = {δ : ‖δ‖₂ ≤ ε‖w‖₂} (norms over every tensor of the group together), the ball of
  module robust criticality (RiFT: Zhu et al., ICCV 2023, "Improving Generalization of Adversarial Training
  via Robust Critical Fine-Tuning", its definition of MRC: max_{‖Δθ‖₂ ≤ ε‖θ^(i)‖₂} L(θ + Δθ^(i)) − L(θ)). The
  step is normalised, δ ← Π(δ + η·ε‖w‖·g/‖g‖) (:func:`robustft.ops.perturb.sam_perturbation`), so one step
  with η = 1 is the first-order maximiser, SAM's ε on the group with ρ = ε‖w‖.
* ``"adaptive_linf"``: B = {δ : |δ_j| ≤ ρ|w_j| for every j}, the element-wise adaptive ℓ∞ ball of worst-case
  adaptive sharpness (Andriushchenko et al., ICML 2023, "A Modern Look at the Relationship between
  Sharpness and Generalization", Eq. 1 with c = |w|, p = ∞), restricted to one layer as in the layer-wise
  sharpness along the WiSE-FT path (Abdollahpoorrostam, 2024, "In Search of the Successful Interpolation:
  On the Role of Sharpness in CLIP Generalization"). The step is the signed one of their ℓ∞ ascent,
  δ ← clip(δ + η·ρ|w|·sign(g), −ρ|w|, ρ|w|); one step with η ≥ 1 is the first-order maximiser ρ|w|·sign(g).

Computed in float32 (float64 for float64 weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from robustft.checks import check_number
from robustft.ops.dtypes import compute_dtype
from robustft.ops.perturb import global_norm, sam_perturbation

__all__ = ["BALLS", "ascent_step", "check_ball", "project_to_ball", "worst_case_increase"]

#: the perturbation balls: relative ℓ2 over the group (RiFT's MRC), element-wise adaptive ℓ∞ (sharpness)
BALLS = ("relative_l2", "adaptive_linf")


def check_ball(ball: str, radius: float, name: str = "radius") -> float:
    """The radius as a float, after checking the ball's name and that the radius is a finite real number ≥ 0
    (``robustft.checks.check_number``: numpy / 0-d torch scalars accepted, str and bool refused)."""
    if ball not in BALLS:
        raise ValueError(f"ball: {ball!r} is not one of {', '.join(BALLS)}")
    return float(check_number(name, radius, low=0.0))  # one rule: real numbers, never str or bool


def _wide(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.detach().to(compute_dtype(like.dtype, t.dtype))


def project_to_ball(
    deltas: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], radius: float, ball: str
) -> list[torch.Tensor]:
    """Π_B(δ): the nearest point of the ball around ``weights`` (ℓ2: δ rescaled onto ε‖w‖ when outside;
    adaptive ℓ∞: each δ_j clipped to ±ρ|w_j|)."""
    if ball == "relative_l2":
        limit = radius * global_norm(weights)
        norm = global_norm(deltas)
        if norm <= limit:
            return [_wide(d, w) for d, w in zip(deltas, weights, strict=True)]
        scale = limit / norm
        return [_wide(d, w) * scale.to(d.device) for d, w in zip(deltas, weights, strict=True)]
    if ball == "adaptive_linf":
        out = []
        for d, w in zip(deltas, weights, strict=True):
            bound = _wide(w, d).abs() * radius
            out.append(torch.maximum(torch.minimum(_wide(d, w), bound), -bound))
        return out
    raise ValueError(f"ball: {ball!r} is not one of {', '.join(BALLS)}")


def ascent_step(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    radius: float,
    ball: str,
    step_size: float = 1.0,
) -> list[torch.Tensor]:
    """One projected ascent step δ ← Π_B(δ + s), s = η·ε‖w‖·g/‖g‖ (relative ℓ2) or η·ρ|w|·sign(g)
    (adaptive ℓ∞); ``step_size`` η is relative to the radius, a missing gradient counts as zero."""
    if ball == "relative_l2":
        rho = step_size * radius * float(global_norm(weights))
        steps = sam_perturbation(list(weights), list(grads), rho)
    elif ball == "adaptive_linf":
        steps = [torch.zeros_like(_wide(w, w)) if g is None else _wide(w, g).abs() * (step_size * radius)
                 * _wide(g, w).sign() for w, g in zip(weights, grads, strict=True)]
    else:
        raise ValueError(f"ball: {ball!r} is not one of {', '.join(BALLS)}")
    moved = [_wide(d, w) + s.to(d.device) for d, w, s in zip(deltas, weights, steps, strict=True)]
    return project_to_ball(moved, weights, radius, ball)


def worst_case_increase(base: float, losses: Sequence[float]) -> float:
    """max(0, max_k L(w + δ_k) − L(w)) over the ascent's iterates (δ = 0 is in the ball, so ≥ 0); a NaN
    loss is skipped, +inf (the loss overflowed inside the ball) counts."""
    return max([0.0] + [v - base for v in losses if not math.isnan(v)])
