"""robustft.ops.plasticity against Algorithm 1 of Dohare et al. (Nature 2024) computed by hand."""

from __future__ import annotations

import pytest
import torch

from robustft.ops.plasticity import (
    bias_corrected_utility,
    contribution_utility,
    replace_units_,
    units_to_replace,
)


def test_contribution_utility_is_the_running_average_of_activation_times_outgoing_weight():
    u = torch.tensor([1.0, 0.0, 2.0])
    h = torch.tensor([0.5, 2.0, 0.0])
    w_out = torch.tensor([[1.0, -1.0, 3.0], [-2.0, 0.5, 1.0]])
    got = contribution_utility(u, h, w_out.abs().sum(0), 0.9)
    want = [0.9 * 1 + 0.1 * 0.5 * 3, 0.9 * 0 + 0.1 * 2 * 1.5, 0.9 * 2 + 0.1 * 0 * 4]
    torch.testing.assert_close(got, torch.tensor(want))


def test_bias_correction_divides_by_one_minus_decay_to_the_age():
    u, ages = torch.tensor([0.3, 0.3, 0.3]), torch.tensor([0, 1, 10])
    got = bias_corrected_utility(u, ages, 0.9)
    torch.testing.assert_close(got, torch.tensor([0.3, 0.3 / 0.1, 0.3 / (1 - 0.9**10)]))
    assert torch.equal(bias_corrected_utility(u, ages, 0.0), u)


def test_units_to_replace_accumulates_the_fraction_and_takes_the_lowest_mature_units():
    ranking = torch.tensor([0.5, 0.1, 0.1, 0.0, 0.3])
    ages = torch.tensor([5, 5, 5, 1, 5])  # unit 3 (lowest) is not mature (m = 2)
    units, carry = units_to_replace(ranking, ages, 2, 0.3, 0.0)  # c = 0.3·4 = 1.2 -> one unit, tie -> index 1
    assert units.tolist() == [1] and carry == pytest.approx(0.2)
    units, carry = units_to_replace(ranking, ages, 2, 0.3, carry)  # c = 1.4 -> one unit
    assert units.tolist() == [1] and carry == pytest.approx(0.4)
    units, carry = units_to_replace(ranking, ages, 2, 0.6, carry)  # c = 2.8 -> two units
    assert units.tolist() == [1, 2] and carry == pytest.approx(0.8)
    units, carry = units_to_replace(ranking, torch.zeros(5, dtype=torch.long), 2, 0.6, 0.5)
    assert units.numel() == 0 and carry == 0.5  # nobody mature: the count does not grow
    units, carry = units_to_replace(ranking, ages, 2, 0.1, 0.0)  # c = 0.4: nobody this step
    assert units.numel() == 0 and carry == pytest.approx(0.4)


def test_replace_units_sets_incoming_fresh_bias_and_outgoing_zero():
    w_in, b_in, w_out = torch.ones(4, 3), torch.ones(4), torch.ones(2, 4)
    w_t = torch.ones(3, 4)  # a Conv1D-style (in × out) incoming weight: units on axis 1
    units = torch.tensor([0, 2])
    fresh = torch.arange(6.0).reshape(2, 3)
    replace_units_([(w_in, 0, fresh), (w_t, 1, fresh.T)], [b_in], (w_out, 1), units)
    assert torch.equal(w_in[[0, 2]], fresh) and torch.equal(w_in[[1, 3]], torch.ones(2, 3))
    assert torch.equal(w_t[:, [0, 2]], fresh.T)
    assert b_in.tolist() == [0, 1, 0, 1]
    assert torch.equal(w_out[:, [0, 2]], torch.zeros(2, 2))
    assert torch.equal(w_out[:, [1, 3]], torch.ones(2, 2))
    with pytest.raises(ValueError, match="expected"):
        replace_units_([(w_in, 0, fresh.T)], [], (w_out, 1), units)
