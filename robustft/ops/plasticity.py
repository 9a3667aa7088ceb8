"""Continual backpropagation's maths: contribution utility of hidden units, which mature units to replace,
and the replacement itself (Dohare et al., "Loss of plasticity in deep continual learning", Nature 632,
2024, Methods "Continual backpropagation", Algorithm 1; the generate-and-test of arXiv:2108.06325).

A hidden unit i of a layer is the output i of a linear map followed by an activation, h_i, read by the next
linear map through its column i. Pure tensor functions; ``robustft.callbacks.plasticity`` decides when to call
them (after each optimizer step) and finds the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustft.ops.dtypes import compute_dtype

__all__ = [
    "bias_corrected_utility",
    "contribution_utility",
    "replace_units_",
    "units_to_replace",
]


def contribution_utility(
    utility: torch.Tensor, mean_abs_activation: torch.Tensor, outgoing_abs_sum: torch.Tensor, decay: float
) -> torch.Tensor:
    """u_i ← η·u_i + (1 − η)·|h_i|·Σ_k |w_out[k, i]|: the running contribution utility of each unit.

    Algorithm 1 of the Nature paper: a unit that is rarely active, or whose outgoing weights are small,
    contributes little to what the next layer computes. ``mean_abs_activation``: |h_i| averaged over the
    step's examples (and positions); ``outgoing_abs_sum``: Σ_k |w_out[k, i]| over the next layer's outputs.
    Returned in float32 or wider (a new tensor).
    """
    dtype = compute_dtype(utility.dtype)
    new = mean_abs_activation.to(dtype) * outgoing_abs_sum.to(dtype)
    return decay * utility.to(dtype) + (1.0 - decay) * new


def bias_corrected_utility(utility: torch.Tensor, ages: torch.Tensor, decay: float) -> torch.Tensor:
    """u_i / (1 − η^{a_i}): the Adam-style bias correction of the authors' code (``lop/algos/gnt.py``), so a
    unit that matured recently (its utility started at 0 a_i steps ago) is not ranked below an old one with
    the same contribution. Units of age 0 keep u (nothing to correct); η = 0 leaves u unchanged."""
    if decay == 0.0:
        return utility
    correction = 1.0 - decay ** ages.to(utility.dtype)
    return torch.where(ages > 0, utility / correction.clamp_min(torch.finfo(utility.dtype).tiny), utility)


def units_to_replace(
    ranking: torch.Tensor, ages: torch.Tensor, maturity_threshold: int, replacement_rate: float,
    accumulated: float,
) -> tuple[torch.Tensor, float]:
    """(indices of the units to reinitialise, the new fractional count): the n lowest-``ranking`` units among
    the mature ones (age > m), where n = ⌊c⌋ and c accumulates ρ·(number of mature units) per step.

    Algorithm 1: c_l ← c_l + n_eligible·ρ; while c_l ≥ 1, replace the lowest-utility mature unit and
    c_l ← c_l − 1 (so a rate below one unit per step still replaces units, deterministically). Ties go to
    the lowest index (a stable sort).
    """
    eligible = torch.nonzero(ages > maturity_threshold).reshape(-1)
    if eligible.numel() == 0:
        return eligible, accumulated
    accumulated += replacement_rate * eligible.numel()
    count = min(int(accumulated), eligible.numel())
    if count == 0:
        return eligible[:0], accumulated
    accumulated -= count
    order = torch.sort(ranking[eligible], stable=True).indices[:count]
    return torch.sort(eligible[order]).values, accumulated


@torch.no_grad()
def replace_units_(
    incoming: Sequence[tuple[torch.Tensor, int, torch.Tensor]],
    incoming_biases: Sequence[torch.Tensor],
    outgoing: tuple[torch.Tensor, int],
    units: torch.Tensor,
) -> None:
    """Reinitialise ``units`` in place: their incoming weights get the fresh values given, their incoming
    biases 0, their outgoing weights 0 (so the network's output does not jump when a unit is replaced).

    ``incoming``: (weight, axis of the units, new values laid out as ``weight.index_select(axis, units)``);
    ``outgoing``: (weight, axis of the units). Axis 0 for an ``nn.Linear`` weight's rows, 1 for a GPT-2
    ``Conv1D`` weight (in × out).
    """
    if units.numel() == 0:
        return
    for weight, axis, fresh in incoming:
        want = list(weight.shape)
        want[axis] = units.numel()
        if list(fresh.shape) != want:
            raise ValueError(f"replace_units_: new incoming weights of shape {tuple(fresh.shape)}, expected "
                             f"{tuple(want)}")
        weight.index_copy_(axis, units.to(weight.device), fresh.to(device=weight.device, dtype=weight.dtype))
    for bias in incoming_biases:
        bias.index_fill_(0, units.to(bias.device), 0.0)
    weight, axis = outgoing
    weight.index_fill_(axis, units.to(weight.device), 0.0)
