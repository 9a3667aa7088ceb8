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

The remedy for straggler layers (:func:`treat_layers`): edit the two end points of the WiSE-FT path on a few
layers only, so θ'(α) = (1−α)·θ'_0 + α·θ'_ft sparsifies their task vector, keeps them at the start, or keeps
them at the fine-tuned values for every α.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from robustft.checks import check_number
from robustft.ops.dtypes import compute_dtype
from robustft.ops.merge import magnitude_prune
from robustft.ops.perturb import global_norm, sam_perturbation

__all__ = [
    "BALLS", "TREATMENTS", "ascent_step", "check_ball", "project_to_ball", "treat_layers",
    "worst_case_increase",
]

#: what :func:`treat_layers` does to the chosen tensors' end points
TREATMENTS = ("sparsify", "start", "finetuned")

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


def treat_layers(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    names: Sequence[str],
    treatment: str = "sparsify",
    density: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(start', end'): the WiSE-FT end points with the tensors ``names`` treated, the others passed through.

    ``"sparsify"``: end' = θ_0 + top-k(τ) on them, τ = end − start, k = ⌊density·numel⌋ largest magnitudes
    (:func:`robustft.ops.merge.magnitude_prune`), so θ'(α) = θ_0 + α·m∘τ; ``"start"``: end' = θ_0 (the
    tensor never leaves the start); ``"finetuned"``: start' = θ_ft (the tensor is fine-tuned at every α).
    """
    if treatment not in TREATMENTS:
        raise ValueError(f"treatment must be one of {TREATMENTS}, got {treatment!r}")
    density = check_number("density", density, 0.0, 1.0)
    missing = [n for n in names if n not in start or n not in end]
    if missing:
        raise ValueError(f"names: tensor {missing[0]!r} is not in both start and end")
    start_out, end_out = dict(start), dict(end)
    for n in names:
        s, e = start[n], end[n]
        if s.shape != e.shape:
            raise ValueError(f"tensor {n!r}: shape {tuple(s.shape)} at start but {tuple(e.shape)} at the end")
        if treatment == "start":
            end_out[n] = s.clone()
        elif treatment == "finetuned":
            start_out[n] = e.clone()
        else:
            dtype = compute_dtype(s.dtype, e.dtype)
            tau = e.to(dtype) - s.to(dtype)
            end_out[n] = (s.to(dtype) + magnitude_prune(tau, density)).to(e.dtype)
    return start_out, end_out
