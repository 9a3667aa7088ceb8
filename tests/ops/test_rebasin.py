"""ops/rebasin.py against dense references: permutation matrices for applying, explicit sums for the cost."""

import numpy as np
import pytest
import torch

from robustft.ops.rebasin import (
    CrossMoments,
    PermAxis,
    PermutationSpec,
    apply_permutations,
    axis_index,
    check_spec,
    loss_barrier,
    matching_cost,
    unit_activations,
)


def _mlp_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (6, 4), "0.bias": (6,), "2.weight": (5, 6), "2.bias": (5,), "4.weight": (3, 5)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


MLP_SPEC = PermutationSpec(
    {"h0": 6, "h1": 5},
    {
        "h0": (PermAxis("0.weight", 0), PermAxis("0.bias", 0), PermAxis("2.weight", 1)),
        "h1": (PermAxis("2.weight", 0), PermAxis("2.bias", 0), PermAxis("4.weight", 1)),
    },
)


def _pmat(perm):
    """P with (P x)[i] = x[perm[i]]."""
    return torch.eye(len(perm), dtype=torch.float64)[perm]


def test_axis_index_matches_a_loop_over_outer_units_and_blocks():
    perm = torch.tensor([2, 0, 1])
    expected = [o * 3 * 4 + int(perm[i]) * 4 + k for o in range(2) for i in range(3) for k in range(4)]
    assert axis_index(perm, block=4, outer=2).tolist() == expected


def test_apply_permutations_is_the_permutation_matrix_product_and_keeps_the_function():
    p = _mlp_params(0)
    perms = {"h0": torch.randperm(6), "h1": torch.randperm(5)}
    P0, P1 = _pmat(perms["h0"]), _pmat(perms["h1"])
    q = apply_permutations(MLP_SPEC, perms, {**p, "other": torch.ones(2)})
    assert torch.equal(q["0.weight"], P0 @ p["0.weight"]) and torch.equal(q["0.bias"], P0 @ p["0.bias"])
    assert torch.equal(q["2.weight"], P1 @ p["2.weight"] @ P0.T) and torch.equal(
        q["4.weight"], p["4.weight"] @ P1.T
    )
    assert torch.equal(q["other"], torch.ones(2))

    def f(w, x):
        h = torch.relu(x @ w["0.weight"].T + w["0.bias"])
        h = torch.relu(h @ w["2.weight"].T + w["2.bias"])
        return h @ w["4.weight"].T

    x = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(f(q, x), f(p, x))


def test_matching_cost_is_the_sum_of_unit_inner_products_with_the_other_permutations_applied():
    a, b = _mlp_params(1), _mlp_params(2)
    perms = {"h0": torch.randperm(6), "h1": torch.randperm(5)}
    P1 = _pmat(perms["h1"])
    # C0[i, j] = <W0a[i], W0b[j]> + b0a[i] b0b[j] + <W2a[:, i], (P1 W2b)[:, j]>
    expected = a["0.weight"] @ b["0.weight"].T + torch.outer(a["0.bias"], b["0.bias"])
    expected += a["2.weight"].T @ (P1 @ b["2.weight"])
    torch.testing.assert_close(matching_cost(MLP_SPEC, "h0", perms, a, b), expected)


def test_matching_cost_of_whole_head_blocks_in_stacked_copies():
    """A fused q|k|v axis (outer=3) of 2 heads of size 3: unit i is head i in each of the three copies."""
    g = torch.Generator().manual_seed(3)
    a = {"qkv": torch.randn(4, 18, generator=g, dtype=torch.float64)}
    b = {"qkv": torch.randn(4, 18, generator=g, dtype=torch.float64)}
    spec = PermutationSpec({"heads": 2}, {"heads": (PermAxis("qkv", 1, block=3, outer=3),)})
    cols = lambda h: [c * 6 + h * 3 + k for c in range(3) for k in range(3)]  # noqa: E731
    expected = torch.tensor(
        [[float((a["qkv"][:, cols(i)] * b["qkv"][:, cols(j)]).sum()) for j in range(2)] for i in range(2)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(matching_cost(spec, "heads", {"heads": torch.arange(2)}, a, b), expected)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PermutationSpec({"h": 6}, {"h": (PermAxis("nope", 0),)}), "no tensor 'nope'"),
        (PermutationSpec({"h": 6}, {"h": (PermAxis("0.bias", 1),)}), "has no dim 1"),
        (PermutationSpec({"h": 4}, {"h": (PermAxis("0.weight", 0),)}), "expected 1·4·1"),
        (
            PermutationSpec(
                {"h": 6, "g": 6}, {"h": (PermAxis("0.weight", 0),), "g": (PermAxis("0.weight", 0),)}
            ),
            "reordered by both 'h' and 'g'",
        ),
        (PermutationSpec({"h": 6}, {}), "differ"),
    ],
)
def test_check_spec_names_the_problem(spec, message):
    shapes = {k: tuple(v.shape) for k, v in _mlp_params(0).items()}
    with pytest.raises(ValueError, match=message):
        check_spec(spec, shapes)
    check_spec(MLP_SPEC, shapes)


def test_cross_moments_correlation_is_numpy_corrcoef_summed_over_a_units_entries():
    g = torch.Generator().manual_seed(4)
    n, width = 5, 3
    batches = [(torch.randn(7, n, width, generator=g), torch.randn(7, n, width, generator=g))
               for _ in range(3)]
    a = torch.cat([x for x, _ in batches]).double().numpy()
    b = torch.cat([y for _, y in batches]).double().numpy()
    b[:, 2, 1] = 3.0  # a constant entry (a dead unit's): correlation 0
    m = CrossMoments(n, width)
    for (x, _), k in zip(batches, range(3), strict=True):
        m.update(x, torch.from_numpy(b[7 * k:7 * (k + 1)]))
    ref = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            for e in range(width):
                if b[:, j, e].std() > 0:
                    ref[i, j] += np.corrcoef(a[:, i, e], b[:, j, e])[0, 1]
    np.testing.assert_allclose(m.correlation().numpy(), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="expected"):
        m.update(torch.zeros(2, n, width + 1), torch.zeros(2, n, width + 1))


def test_unit_activations_groups_blocks_of_stacked_copies():
    x = torch.arange(2 * 3 * 2 * 2).reshape(2, 12).float()  # 2 samples, outer 3, n 2, block 2
    got = unit_activations(x, PermAxis("w", 1, block=2, outer=3), 2)
    for s in range(2):
        for i in range(2):
            want = [x[s, o * 4 + i * 2 + k] for o in range(3) for k in range(2)]
            assert got[s, i].tolist() == [float(v) for v in want]
    with pytest.raises(ValueError, match="12 features, expected 1·2·2"):
        unit_activations(x, PermAxis("w", 1, block=2), 2)


def test_loss_barrier_is_the_largest_gap_above_the_chord():
    lambdas = [0.0, 0.25, 0.5, 0.75, 1.0]
    losses = [1.0, 2.5, 3.0, 2.0, 2.0]
    chord = [1.0 + x * (2.0 - 1.0) for x in lambdas]
    assert loss_barrier(lambdas, losses) == pytest.approx(max(v - c for v, c in zip(losses, chord)))
    assert loss_barrier([1.0, 0.0], [2.0, 1.0]) == pytest.approx(0.0)  # a straight line: no barrier
    assert loss_barrier([0.0, 0.5, 1.0], [1.0, 0.5, 1.0]) == 0.0  # below the chord inside: the ends count
    with pytest.raises(ValueError, match="must include"):
        loss_barrier([0.0, 0.5], [1.0, 2.0])
