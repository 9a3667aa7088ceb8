"""robustft.ops.sharpness against the balls' dense definitions computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustft.ops.sharpness import ascent_step, check_ball, project_to_ball, treat_layers, worst_case_increase


def _tensors(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [torch.randn(s, generator=g) * scale for s in shapes]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _in_ball(deltas, weights, radius, ball):
    if ball == "relative_l2":
        return float(_flat(deltas).norm()) <= radius * float(_flat(weights).norm()) * (1 + 1e-6)
    return bool((_flat(deltas).abs() <= radius * _flat(weights).abs() * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("ball", ["relative_l2", "adaptive_linf"])
@pytest.mark.parametrize("step_size", [0.3, 1.0, 5.0])
def test_every_ascent_step_stays_in_the_ball(ball, step_size):
    w = _tensors(0)
    deltas = [torch.zeros_like(t) for t in w]
    for seed in range(1, 8):  # several steps from 0 along unrelated gradients
        deltas = ascent_step(deltas, w, _tensors(seed, scale=10.0 ** (seed % 3)), 0.1, ball, step_size)
        assert _in_ball(deltas, w, 0.1, ball)


def test_relative_l2_projection_rescales_onto_the_sphere_and_keeps_inner_points():
    w = _tensors(0)
    far = _tensors(1, scale=100.0)
    projected = project_to_ball(far, w, 0.1, "relative_l2")
    assert math.isclose(float(_flat(projected).norm()), 0.1 * float(_flat(w).norm()), rel_tol=1e-6)
    # the same direction: the projection is δ·(ε‖w‖/‖δ‖)
    expected = _flat(far) * (0.1 * _flat(w).norm() / _flat(far).norm())
    torch.testing.assert_close(_flat(projected), expected)
    near = [t * 1e-4 for t in _tensors(2)]
    for a, b in zip(project_to_ball(near, w, 0.1, "relative_l2"), near, strict=True):
        assert torch.equal(a, b)


def test_adaptive_linf_projection_clips_each_entry_to_its_weight():
    w = _tensors(0)
    d = _tensors(1)
    for p, di, wi in zip(project_to_ball(d, w, 0.2, "adaptive_linf"), d, w, strict=True):
        bound = 0.2 * wi.abs()
        torch.testing.assert_close(p, torch.where(di.abs() <= bound, di, bound * di.sign()))


def test_one_step_from_zero_is_the_first_order_maximiser():
    """η = 1 from δ = 0: ε‖w‖·g/‖g‖ (relative ℓ2, SAM's ε) and ρ|w|·sign(g) (adaptive ℓ∞), densely."""
    w, g = _tensors(0), _tensors(1)
    zero = [torch.zeros_like(t) for t in w]
    l2 = ascent_step(zero, w, g, 0.1, "relative_l2")
    expected = _flat(g) * (0.1 * _flat(w).norm() / _flat(g).norm())
    torch.testing.assert_close(_flat(l2), expected)
    linf = ascent_step(zero, w, g, 0.1, "adaptive_linf")
    torch.testing.assert_close(_flat(linf), 0.1 * _flat(w).abs() * _flat(g).sign())


def test_a_missing_gradient_does_not_move_its_tensor():
    w, g = _tensors(0), _tensors(1)
    g[1] = None
    zero = [torch.zeros_like(t) for t in w]
    for ball in ("relative_l2", "adaptive_linf"):
        assert not ascent_step(zero, w, g, 0.1, ball)[1].any()


def test_float64_weights_are_searched_in_float64():
    w = [t.double() for t in _tensors(0)]
    g = [t.double() for t in _tensors(1)]
    out = ascent_step([torch.zeros_like(t) for t in w], w, g, 0.1, "relative_l2")
    assert all(t.dtype == torch.float64 for t in out)


def test_worst_case_increase_is_the_best_iterate_and_never_negative():
    assert worst_case_increase(1.0, [0.5, 1.25, 1.1]) == pytest.approx(0.25)
    assert worst_case_increase(1.0, [0.5, 0.9]) == 0.0  # δ = 0 is in the ball
    assert worst_case_increase(1.0, [float("nan"), 1.5]) == pytest.approx(0.5)
    assert worst_case_increase(1.0, [float("inf")]) == float("inf")


@pytest.mark.parametrize(("ball", "radius", "message"), [
    ("l2", 0.1, "ball: 'l2' is not one of relative_l2, adaptive_linf"),
    ("relative_l2", -0.1, "radius must be >= 0.0, got -0.1"),
    ("adaptive_linf", float("nan"), "radius must be a finite number, got nan"),
    ("adaptive_linf", "big", "radius must be a finite number, got 'big'"),
    ("adaptive_linf", "0.1", "radius must be a finite number, got '0.1'"),  # float() would take it
    ("relative_l2", True, "radius must be a finite number, got True"),
])
def test_bad_ball_options_are_named(ball, radius, message):
    with pytest.raises(ValueError, match=message):
        check_ball(ball, radius)


@pytest.mark.parametrize("radius", [np.float32(0.5), torch.tensor(0.5), 0.5, 1])
def test_ball_radius_takes_real_scalars(radius):
    """robustft.checks' one rule: numpy and 0-d torch scalars are numbers (same value as the Python float)."""
    assert check_ball("adaptive_linf", radius) == float(radius)


def test_treat_layers_edits_only_the_named_tensors_end_points():
    g = torch.Generator().manual_seed(7)
    start = {n: torch.randn(4, 5, generator=g, dtype=torch.float64) for n in ("a", "b")}
    end = {n: t + torch.randn(4, 5, generator=g, dtype=torch.float64) for n, t in start.items()}
    s, e = treat_layers(start, end, ["a"], "sparsify", density=0.25)
    tau = [float(x) for x in (end["a"] - start["a"]).reshape(-1)]
    keep = sorted(range(20), key=lambda j: -abs(tau[j]))[:5]  # ⌊0.25·20⌋ largest magnitudes
    want = [float(start["a"].reshape(-1)[j]) + (tau[j] if j in keep else 0.0) for j in range(20)]
    assert e["a"].reshape(-1).tolist() == pytest.approx(want, abs=1e-12)
    assert s["a"] is start["a"] and e["b"] is end["b"] and s["b"] is start["b"]  # untouched pass through
    s, e = treat_layers(start, end, ["b"], "start")
    assert torch.equal(e["b"], start["b"]) and torch.equal(e["a"], end["a"])
    s, e = treat_layers(start, end, ["b"], "finetuned")
    for alpha in (0.0, 0.3, 1.0):  # θ'(α) of b is θ_ft at every α
        torch.testing.assert_close((1 - alpha) * s["b"] + alpha * e["b"], end["b"])
    with pytest.raises(ValueError, match="treatment must be one of"):
        treat_layers(start, end, ["a"], "prune")
    with pytest.raises(ValueError, match="'c' is not in both"):
        treat_layers(start, end, ["c"])
    with pytest.raises(ValueError, match="density"):
        treat_layers(start, end, ["a"], density=1.5)
