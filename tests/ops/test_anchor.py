"""robustft.ops.anchor against dense references: flattened sums, full SVDs, the update formula by hand."""

from __future__ import annotations

import pytest
import torch

from robustft.ops.anchor import (
    anchor_penalty,
    anchor_pull,
    decoupled_anchor_step_,
    sorted_values,
    spectral_penalty,
    top_singular_value,
    wasserstein_penalty,
)


def _tensors(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


SHAPES = [(5, 3), (4,), (2, 3, 2, 2)]


@pytest.mark.parametrize("weighted", [False, True])
def test_anchor_penalty_value_and_gradient(weighted):
    params = [t.requires_grad_() for t in _tensors(0, SHAPES)]
    starts = _tensors(1, SHAPES)
    weights = [t.abs() for t in _tensors(2, SHAPES)] if weighted else None
    value = anchor_penalty(params, starts, weights)
    flat = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, starts)]).double()
    w = torch.cat([x.flatten() for x in weights]).double() if weighted else torch.ones_like(flat)
    assert value.item() == pytest.approx(0.5 * float((w * flat**2).sum()), rel=1e-6)
    value.backward()
    for i, (p, s) in enumerate(zip(params, starts)):
        want = (p.detach() - s) * (weights[i] if weighted else 1.0)
        torch.testing.assert_close(p.grad, want)


def test_anchor_penalty_of_bf16_weights_is_float32_of_the_float32_start():
    start = _tensors(3, [(6, 6)])[0]
    live = (start + 0.5).to(torch.bfloat16).requires_grad_()
    value = anchor_penalty([live], [start])
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(0.5 * float(((live.detach().float() - start) ** 2).sum()), rel=1e-6)


def test_anchor_penalty_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="2 tensors, 1 starts"):
        anchor_penalty(_tensors(0, [(2,), (3,)]), _tensors(0, [(2,)]))
    with pytest.raises(ValueError, match="no tensor"):
        anchor_penalty([], [])


@pytest.mark.parametrize("power", [1, 2, 3])
def test_spectral_penalty_value_and_gradient_against_a_full_svd(power):
    mats = [t.requires_grad_() for t in _tensors(4, [(6, 4), (3, 7), (4, 2, 3, 3)], torch.float64)]
    targets = [0.7, 1.0, 2.5]
    value = spectral_penalty(mats, targets, power)
    value.backward()
    total = 0.0
    for w, tau in zip(mats, targets):
        m = w.detach().reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(m)
        sigma = s[0]
        total += float((sigma**power - tau**power) ** 2)
        want = 2 * (sigma**power - tau**power) * power * sigma ** (power - 1) * torch.outer(u[:, 0], vh[0])
        torch.testing.assert_close(w.grad.reshape(m.shape), want)
    assert value.item() == pytest.approx(total, rel=1e-10)


def test_top_singular_value_refuses_a_vector():
    assert top_singular_value(torch.diag(torch.tensor([3.0, -5.0, 1.0]))).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="matrix is needed"):
        top_singular_value(torch.ones(3))


def test_spectral_penalty_refuses_mismatched_lists():
    with pytest.raises(ValueError, match="2 matrices for 1 targets"):
        spectral_penalty(_tensors(0, [(2, 2), (3, 3)]), [1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoupled_step_against_its_formula(dtype):
    """pull = c·(θ − θ_start) on the θ given (the pre-step θ); then θ' ← θ' − pull on the θ' of that time."""
    live = _tensors(5, SHAPES, dtype)
    starts = _tensors(6, SHAPES)
    factors = [0.1, 0.0, 0.35]
    pulls = anchor_pull(live, starts, factors)
    for p, s, c, d in zip(live, starts, factors, pulls):
        assert d.dtype == torch.float32 and torch.equal(d, c * (p.float() - s))
    moved = [p + 0.5 for p in live]  # an optimizer step in between: the pull is not taken again
    want = [((m.float() - d).to(dtype)) for m, d in zip(moved, pulls)]
    decoupled_anchor_step_(moved, pulls)
    for m, w in zip(moved, want):
        assert torch.equal(m, w)


def test_wasserstein_penalty_is_the_optimal_matching_cost_found_by_an_assignment_solver():
    """Σ_i (θ_(i) − θ⁰_(i))² equals min over matchings π of Σ_i (θ_i − θ⁰_π(i))² (scipy's Hungarian solver on
    the dense cost matrix), per tensor; its gradient is 2·(θ_j − θ⁰ of θ_j's rank)."""
    from scipy.optimize import linear_sum_assignment

    params = [t.requires_grad_() for t in _tensors(7, [(5, 3), (4,), (2, 3, 2)], torch.float64)]
    starts = _tensors(8, [(5, 3), (4,), (2, 3, 2)], torch.float64)
    value = wasserstein_penalty(params, [sorted_values(s) for s in starts])
    value.backward()
    total = 0.0
    for p, s in zip(params, starts):
        x, y = p.detach().reshape(-1), s.reshape(-1)
        cost = (x[:, None] - y[None, :]).square().numpy()
        rows, cols = linear_sum_assignment(cost)
        total += float(cost[rows, cols].sum())
        want = 2 * (x - y[torch.as_tensor(cols)])  # the optimal partner of each entry
        torch.testing.assert_close(p.grad.reshape(-1), want)
    assert value.item() == pytest.approx(total, rel=1e-10)
    # a permutation of the start costs nothing (L2-SP would charge it)
    perm = starts[0].reshape(-1)[torch.randperm(15, generator=torch.Generator().manual_seed(0))]
    assert wasserstein_penalty([perm], [sorted_values(starts[0])]).item() == 0.0


def test_wasserstein_penalty_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 tensors, 1 starts"):
        wasserstein_penalty(_tensors(0, [(2,), (3,)]), [torch.zeros(2)])
    with pytest.raises(ValueError, match="tensor 0 has 3 entries, its start 2"):
        wasserstein_penalty(_tensors(0, [(3,)]), [torch.zeros(2)])
    with pytest.raises(ValueError, match="no tensor"):
        wasserstein_penalty([], [])
