"""Every merge rule of robustft.ops.merge against its paper's formula written out with explicit Python loops.

The references below never call robustft: they walk the elements one by one (sorting magnitudes with
``sorted``, counting agreeing signs by hand), so a vectorisation or masking bug in the library shows up.
"""

import math

import pytest
import torch

from robustft.ops import merge as M

SHAPE = (6, 7)


def _rand(n, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def _flat(t):
    return [float(x) for x in t.reshape(-1)]


def _ref_topk_keep(values, k):
    """Indices of the k largest |values| by a full Python sort (values are distinct in these tests)."""
    order = sorted(range(len(values)), key=lambda j: abs(values[j]), reverse=True)
    return set(order[:k])


def _ref_prune(t, density):
    v = _flat(t)
    k = max(1, int(density * len(v)))
    keep = _ref_topk_keep(v, k)
    return torch.tensor([v[j] if j in keep else 0.0 for j in range(len(v))], dtype=t.dtype).view_as(t)


def _ref_ties(deltas, density, weights):
    trimmed = [_flat(_ref_prune(d, density)) for d in deltas]
    out = []
    for j in range(len(trimmed[0])):
        total = sum(w * t[j] for w, t in zip(weights, trimmed, strict=True))
        gamma = 1.0 if total >= 0 else -1.0  # stated tie rule: sgn(0) = +1
        num = den = 0.0
        for w, t in zip(weights, trimmed, strict=True):
            x = w * t[j]
            if x != 0 and math.copysign(1.0, x) == gamma:
                num += x
                den += w
        out.append(num / den if den != 0 else 0.0)
    return torch.tensor(out, dtype=deltas[0].dtype).view_as(deltas[0])


def test_task_arithmetic_is_weighted_sum():
    deltas = _rand(3)
    w = [0.5, -1.0, 2.0]
    ref = torch.zeros(SHAPE, dtype=torch.float64)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            ref[i, j] = sum(wk * d[i, j] for wk, d in zip(w, deltas, strict=True))
    torch.testing.assert_close(M.task_arithmetic(deltas, w), ref)
    torch.testing.assert_close(M.task_arithmetic(deltas), deltas[0] + deltas[1] + deltas[2])


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.77, 1.0])
def test_magnitude_prune_keeps_top_fraction(density):
    (d,) = _rand(1, seed=3)
    out = M.magnitude_prune(d, density)
    torch.testing.assert_close(out, _ref_prune(d, density))
    assert int((out != 0).sum()) == max(1, int(density * d.numel()))
    torch.testing.assert_close(M.trim_top_k(d, density), out)


def test_magnitude_prune_large_tensor_uses_exact_k():
    d = torch.randn(1000, 37, generator=torch.Generator().manual_seed(1))
    out = M.magnitude_prune(d, 0.8)  # k > n/2 takes the complement path
    kept = out != 0
    assert int(kept.sum()) == int(0.8 * d.numel())
    assert d.abs()[kept].min() > d.abs()[~kept].max()


def test_elect_sign_and_tie_rule():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])
    b = torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0])
    assert M.elect_sign([a, b]).tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]  # exact 0 sum -> +1


def test_disjoint_mean_counts_only_agreeing_entries():
    a = torch.tensor([2.0, -2.0, 0.0, 4.0])
    b = torch.tensor([4.0, 1.0, 0.0, -4.0])
    sign = M.elect_sign([a, b])
    # entry 0: both agree -> 3; entry 1: -1 sum -> only a -> -2; entry 2: nothing -> 0; entry 3: tie -> +4
    assert M.disjoint_mean([a, b], sign).tolist() == [3.0, -2.0, 0.0, 4.0]


@pytest.mark.parametrize(
    "density,weights", [(0.3, [1.0, 1.0, 1.0]), (0.6, [0.5, 1.5, 1.0]), (1.0, [1, 1, 1])]
)
def test_ties_matches_dense_reference(density, weights):
    deltas = _rand(3, seed=7)
    torch.testing.assert_close(M.ties(deltas, density, weights), _ref_ties(deltas, density, weights))


def test_ties_per_model_density():
    deltas = _rand(2, seed=8)
    got = M.ties(deltas, [0.2, 0.9])
    trimmed = [_ref_prune(deltas[0], 0.2), _ref_prune(deltas[1], 0.9)]
    torch.testing.assert_close(got, _ref_ties(trimmed, 1.0, [1.0, 1.0]))


def test_dare_matches_formula_with_same_draws():
    (d,) = _rand(1, seed=2)
    p = 0.3
    got = M.dare(d, p, torch.Generator().manual_seed(5))
    u = torch.rand(d.shape, generator=torch.Generator().manual_seed(5))  # the same uniform draws
    ref = torch.zeros_like(d)
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            ref[i, j] = d[i, j] / (1 - p) if u[i, j] >= p else 0.0
    torch.testing.assert_close(got, ref)


def test_dare_is_unbiased_over_seeds():
    """Mean over N seeds of DARE(delta) -> delta. Per element the std of one draw is |d| sqrt(p/(1-p)), so the
    mean of N draws is within 5 standard errors |d| sqrt(p/((1-p)N)) with overwhelming probability."""
    d = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p, n = 0.6, 4000
    acc = torch.zeros_like(d)
    for seed in range(n):
        acc += M.dare(d, p, torch.Generator().manual_seed(seed))
    mean = acc / n
    tol = 5 * d.abs() * math.sqrt(p / ((1 - p) * n))
    assert bool(((mean - d).abs() <= tol).all()), float(((mean - d).abs() / tol).max())
    # and the drop fraction is p (binomial, 5 sigma)
    kept = sum(int((M.dare(d, p, torch.Generator().manual_seed(s)) != 0).sum()) for s in range(50))
    total = 50 * d.numel()
    assert abs(kept / total - (1 - p)) < 5 * math.sqrt(p * (1 - p) / total)


def test_dare_merge_reproducible_and_equals_composition():
    deltas = _rand(3, seed=4)
    a = M.dare_merge(deltas, 0.5, seed=11, weights=[1, 2, 3])
    b = M.dare_merge(deltas, 0.5, seed=11, weights=[1, 2, 3])
    c = M.dare_merge(deltas, 0.5, seed=12, weights=[1, 2, 3])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    gen = torch.Generator().manual_seed(11)
    dropped = [M.dare(d, 0.5, gen) for d in deltas]
    ref = sum(w * x for w, x in zip([1, 2, 3], dropped, strict=True))
    torch.testing.assert_close(a, ref)
    t = M.dare_merge(deltas, 0.5, seed=11, method="ties", density=0.5)
    torch.testing.assert_close(t, _ref_ties(dropped, 0.5, [1.0, 1.0, 1.0]))


@pytest.mark.parametrize("beta,gamma", [(0.1, 0.5), (0.0, 0.3), (0.2, 0.0), (0.05, 0.9)])
def test_breadcrumbs_drops_both_tails(beta, gamma):
    (d,) = _rand(1, seed=9)
    v = _flat(d)
    n = len(v)
    order = sorted(range(n), key=lambda j: abs(v[j]))  # ascending magnitude
    keep = set(order[int(gamma * n) : n - int(beta * n)])
    ref = torch.tensor([v[j] if j in keep else 0.0 for j in range(n)], dtype=d.dtype).view_as(d)
    torch.testing.assert_close(M.breadcrumbs(d, beta, gamma), ref)


def test_model_stock_formula():
    base, *ft = _rand(4, seed=10)
    ft = [base + 0.3 * f + 0.5 * ft[0] for f in ft]  # correlated fine-tunes: cos > 0
    n = len(ft)
    offs = [_flat(f - base) for f in ft]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = sum(x * y for x, y in zip(offs[i], offs[j], strict=True))
            cos.append(dot / math.sqrt(sum(x * x for x in offs[i]) * sum(y * y for y in offs[j])))
    c = sum(cos) / len(cos)
    t = n * c / (1 + (n - 1) * c)
    ref = t * (sum(ft) / n) + (1 - t) * base
    torch.testing.assert_close(M.model_stock(base, ft), ref)


def test_fisher_merge_formula():
    params = _rand(3, seed=12)
    fishers = [p.abs() ** 2 for p in _rand(3, seed=13)]
    w = [1.0, 2.0, 0.5]
    eps = 1e-3
    ref = torch.zeros(SHAPE, dtype=torch.float64)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            num = sum(wk * (f[i, j] + eps) * p[i, j] for wk, f, p in zip(w, fishers, params, strict=True))
            den = sum(wk * (f[i, j] + eps) for wk, f in zip(w, fishers, strict=True))
            ref[i, j] = num / den
    torch.testing.assert_close(M.fisher_merge(params, fishers, eps=eps, weights=w), ref)
    # equal Fishers -> weighted average
    same = [torch.ones(SHAPE, dtype=torch.float64)] * 3
    ref = sum(a * b for a, b in zip(w, params, strict=True)) / 3.5
    torch.testing.assert_close(M.fisher_merge(params, same, weights=w), ref)


def test_tall_and_consensus_masks():
    deltas = _rand(4, seed=14)
    lam, k = 0.6, 2
    masks = M.tall_masks(deltas, lam)
    cmask = M.consensus_mask(deltas, k, lam)
    merged = M.consensus_merge(deltas, k, lam, weights=[1, 1, 1, 1])
    for idx in range(deltas[0].numel()):
        vals = [float(d.reshape(-1)[idx]) for d in deltas]
        mtl = sum(vals)
        votes = 0
        for t, v in enumerate(vals):
            m = abs(v) >= lam * abs(mtl - v)
            assert bool(masks[t].reshape(-1)[idx]) == m
            votes += m
        assert bool(cmask.reshape(-1)[idx]) == (votes >= k)
        assert float(merged.reshape(-1)[idx]) == pytest.approx(mtl if votes >= k else 0.0, abs=1e-12)


def test_inputs_are_not_modified():
    deltas = _rand(3, seed=16)
    copies = [d.clone() for d in deltas]
    M.ties(deltas, 0.3)
    M.dare_merge(deltas, 0.5, seed=0, method="ties", density=0.5)
    M.breadcrumbs(deltas[0], 0.1, 0.2)
    M.consensus_merge(deltas)
    M.model_stock(deltas[0], deltas[1:])
    for d, c in zip(deltas, copies, strict=True):
        torch.testing.assert_close(d, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: M.magnitude_prune(d[0], 1.5), "density"),
        (lambda d: M.dare(d[0], 1.0, torch.Generator()), "drop_rate"),
        (lambda d: M.breadcrumbs(d[0], 0.6, 0.6), "beta \\+ gamma"),
        (lambda d: M.ties([d[0], d[1][:2]], 0.5), "deltas\\[1\\] has shape"),
        (lambda d: M.task_arithmetic(d, [1.0]), "weights"),
        (lambda d: M.model_stock(d[0], [d[1]]), "at least 2"),
        (lambda d: M.fisher_merge(d[:2], [d[0], -d[0].abs() - 1]), "negative"),
        (lambda d: M.dare_merge(d, 0.1, 0, method="median"), "method"),
    ],
)
def test_bad_input_names_the_cause(call, match):
    with pytest.raises(ValueError, match=match):
        call(_rand(3))
