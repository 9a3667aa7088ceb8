"""Every merge rule of robustft.ops.merge against its paper's formula written out with explicit Python loops.

The references below never call robustft: they walk the elements one by one (sorting magnitudes with
``sorted``, counting agreeing signs by hand), so a vectorisation or masking bug in the library shows up.
"""

import math

import numpy as np
import pytest
import torch
from scipy import linalg as scipy_linalg

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
        out.append(num / den if den != 0 else num)  # mergekit: a zero divisor becomes 1
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


@pytest.fixture(params=["whole", "chunked"])
def streaming(request, monkeypatch):
    """Run a test as is, and again with 7-element chunks and the sampled bracket on every tensor (so the
    6 x 7 test tensors cross chunk boundaries and take the selection path of large tensors)."""
    if request.param == "chunked":
        monkeypatch.setattr(M, "CHUNK", 7)
        monkeypatch.setattr(M, "_SELECT_DIRECT", 4)
    return request.param


@pytest.mark.parametrize(
    "density,weights",
    [(0.3, [1.0, 1.0, 1.0]), (0.6, [0.5, 1.5, 1.0]), (1.0, [1, 1, 1]), (0.5, [1.0, -1.0, 0.7])],
)
def test_ties_matches_dense_reference(density, weights, streaming):
    deltas = _rand(3, seed=7)
    torch.testing.assert_close(M.ties(deltas, density, weights), _ref_ties(deltas, density, weights))
    out = deltas[0].clone()
    copy = [out, *deltas[1:]]
    assert M.ties(copy, density, weights, out=out) is out  # written over an input, chunk by chunk
    torch.testing.assert_close(out, _ref_ties(deltas, density, weights))


def _ref_top_k(keys, k):
    """Mask of the k largest keys, ties to the lowest index: a full stable sort."""
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[torch.sort(-keys, stable=True).indices[:k]] = True
    return mask


@pytest.mark.parametrize("n", [50, 1000, 70_000])  # direct kthvalue; sampled bracket (> 65536 entries)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_top_k_cut_is_the_exact_kth_value_with_ties_to_the_lowest_index(n, kind):
    g = torch.Generator().manual_seed(n)
    if kind == "random":
        x = torch.randn(n, generator=g)
    else:  # five magnitudes only: every cut falls inside a run of equal values
        x = torch.randint(-2, 3, (n,), generator=g).float()
    keys = x.abs()
    for k in sorted({1, n // 10, n // 2, n - 1, n}):
        threshold, last = M.top_k_cut(x, k, absolute=True)
        assert threshold == float(torch.kthvalue(keys, n - k + 1).values)
        kept = (keys > threshold) | ((keys == threshold) & (torch.arange(n) <= last))
        assert torch.equal(kept, _ref_top_k(keys, k))
        if kind == "random":  # distinct values: the same set as torch.topk
            assert kept[torch.topk(keys, k).indices].all()
        assert torch.equal(M.top_k_mask(x, k), _ref_top_k(x, k))  # signed values, largest and smallest
        assert torch.equal(M.top_k_mask(x, k, largest=False), _ref_top_k(-x, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_top_k_cut_in_half_precision_counts_exactly(dtype):
    """Counts of 2^18-entry chunks are exact (float32), not half-precision sums; half types tie a lot."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    keys = x.abs().float()
    k = 31_234
    threshold, last = M.top_k_cut(x, k, absolute=True)
    assert threshold == float(torch.kthvalue(keys, x.numel() - k + 1).values)
    kept = (keys > threshold) | ((keys == threshold) & (torch.arange(x.numel()) <= last))
    assert torch.equal(kept, _ref_top_k(keys, k))


def test_top_k_cut_refuses_nan_and_bad_k():
    x = torch.randn(100)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        M.top_k_cut(x, 10, absolute=True)
    with pytest.raises(ValueError, match="k must be in"):
        M.top_k_cut(torch.randn(5), 6)


def test_magnitude_prune_tie_heavy_keeps_exactly_k_lowest_indices_first(streaming):
    x = torch.tensor([1.0, -2.0, 2.0, 0.0, -1.0, 2.0, 1.0, -1.0, 2.0, 1.0] * 5).view(5, 10)
    for density in (0.1, 0.3, 0.55, 0.9):
        k = int(density * x.numel())
        ref = x * _ref_top_k(x.abs().reshape(-1), k).view_as(x)
        torch.testing.assert_close(M.magnitude_prune(x, density), ref, rtol=0, atol=0)


def test_disjoint_mean_drops_disagreeing_infinities():
    """A disagreeing inf is dropped (no inf * 0 = NaN from a float mask)."""
    a = torch.tensor([float("inf"), 1.0, 2.0])
    b = torch.tensor([-float("inf"), -float("inf"), 2.0])
    c = torch.tensor([-float("inf"), -1.0, -5.0])
    sign = M.elect_sign([a, b, c])
    assert sign.tolist() == [-1.0, -1.0, -1.0]
    assert M.disjoint_mean([a, b, c], sign).tolist() == [-float("inf"), -float("inf"), -5.0]


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


def _ref_l1_rescale(masked, original):
    """mergekit's ``rescaled_masked_tensor`` (L1): masked |original|_1 / |masked|_1, unless one is < 1e-7."""
    before, after = sum(abs(x) for x in _flat(original)), sum(abs(x) for x in _flat(masked))
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def test_random_drop_is_mergekit_bernoulli_keep_then_l1_rescale():
    """density is the keep probability (mergekit), the same draw u < density, and the L1 norm restored."""
    (d,) = _rand(1, seed=4)
    u = torch.rand(d.shape, generator=torch.Generator().manual_seed(5))
    masked = torch.where(u < 0.3, d, torch.zeros_like(d))
    for rescale, ref in ((False, masked), (True, _ref_l1_rescale(masked, d))):
        got = M.random_drop(d, 0.3, torch.Generator().manual_seed(5), rescale)
        torch.testing.assert_close(got, ref)
    assert torch.equal(M.random_drop(d, 1.0, torch.Generator(), True), d)  # density 1: nothing drawn
    # the keep fraction is density (binomial, 5 sigma)
    kept = sum(int((M.random_drop(d, 0.3, torch.Generator().manual_seed(s)) != 0).sum()) for s in range(50))
    total = 50 * d.numel()
    assert abs(kept / total - 0.3) < 5 * math.sqrt(0.21 / total)


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_merge_reproducible_and_equals_composition(normalize):
    deltas = _rand(3, seed=4)
    w = [1.0, 2.0, 3.0]
    a = M.dare_merge(deltas, 0.5, seed=11, weights=w, normalize=normalize)
    b = M.dare_merge(deltas, 0.5, seed=11, weights=w, normalize=normalize)
    c = M.dare_merge(deltas, 0.5, seed=12, weights=w, normalize=normalize)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    gen = torch.Generator().manual_seed(11)
    dropped = [M.random_drop(d, 0.5, gen) for d in deltas]
    ref = sum(wi * x for wi, x in zip(w, dropped, strict=True))
    torch.testing.assert_close(a, ref / 6 if normalize else ref)
    t = M.dare_merge(deltas, 0.5, seed=11, weights=w, method="ties", normalize=normalize)
    torch.testing.assert_close(t, _ref_disjoint(dropped, w, normalize))


@pytest.mark.parametrize("density,gamma", [(0.4, 0.1), (0.7, 0.0), (0.5, 0.2), (0.2, 0.9), (1.0, 0.3)])
def test_breadcrumbs_is_mergekit_magnitude_outliers(density, gamma):
    """mergekit: of the magnitudes sorted ascending keep positions [n_bot, n_bot + k), k = floor(density n),
    n_bot = max(0, n - k - floor(gamma n)); density 1 keeps everything."""
    (d,) = _rand(1, seed=9)
    v = _flat(d)
    n = len(v)
    order = sorted(range(n), key=lambda j: abs(v[j]))  # ascending magnitude
    k = int(density * n)
    n_bot = max(0, n - k - int(gamma * n))
    keep = set(order[n_bot : n_bot + k]) if density < 1 else set(range(n))
    ref = torch.tensor([v[j] if j in keep else 0.0 for j in range(n)], dtype=d.dtype).view_as(d)
    torch.testing.assert_close(M.breadcrumbs(d, density, gamma), ref)
    torch.testing.assert_close(M.breadcrumbs(d, density, gamma, rescale=True), _ref_l1_rescale(ref, d))


@pytest.mark.parametrize("density,weights", [(0.3, [1.0, 0.5, 2.0]), (1.0, [1.0, 1.0, 1.0])])
def test_ties_normalize_and_rescale_are_mergekits(density, weights, streaming):
    """normalize false: the disjoint sum; rescale: each trimmed delta scaled back to its L1 norm first."""
    deltas = _rand(3, seed=8)
    trimmed = [_ref_l1_rescale(_ref_prune(d, density), d) for d in deltas]
    for normalize in (True, False):
        got = M.ties(deltas, density, weights, normalize=normalize, rescale=True)
        torch.testing.assert_close(got, _ref_disjoint(trimmed, weights, normalize))
        plain = [_ref_prune(d, density) for d in deltas]
        torch.testing.assert_close(M.ties(deltas, density, weights, normalize=normalize),
                                   _ref_disjoint(plain, weights, normalize))  # fmt: skip


def test_model_stock_filter_wise_is_one_t_per_row():
    """mergekit's filter_wise: the angle of each row (last axis) of the deltas, its own t."""
    base, *ft = _rand(3, seed=10)
    ft = [base + 0.3 * f + 0.5 * ft[0] for f in ft]
    rows = []
    for i in range(base.shape[0]):
        a, b = (f[i] - base[i] for f in ft)
        c = float(a @ b) / max(float(a.norm() * b.norm()), 1e-6)
        t = 2 * c / (1 + c)
        rows.append(t * (ft[0][i] + ft[1][i]) / 2 + (1 - t) * base[i])
    torch.testing.assert_close(M.model_stock(base, ft, filter_wise=True), torch.stack(rows))
    v = base[0]  # a 1-D tensor is one row: the same as the flattened rule
    rows = [f[0] for f in ft]
    torch.testing.assert_close(M.model_stock(v, rows, True), M.model_stock(v, rows))


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
    M.ties(deltas, 0.3, rescale=True)
    M.dare_merge(deltas, 0.5, seed=0, method="ties")
    M.breadcrumbs(deltas[0], 0.5, 0.2, rescale=True)
    M.consensus_merge(deltas)
    M.model_stock(deltas[0], deltas[1:])
    for d, c in zip(deltas, copies, strict=True):
        torch.testing.assert_close(d, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: M.magnitude_prune(d[0], 1.5), "density"),
        (lambda d: M.dare(d[0], 1.0, torch.Generator()), "drop_rate"),
        (lambda d: M.breadcrumbs(d[0], 0.6, 1.5), "gamma"),
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


# -- methods of mergekit 0.1.5 (issue 16) ------------------------------------------------------------------
def _ref_disjoint(deltas, weights, normalize=True, sign_weights=None):
    """TIES' sign election + disjoint mean (or sum) element by element; ``sign_weights`` elect the sign."""
    flat = [_flat(d) for d in deltas]
    sw = weights if sign_weights is None else sign_weights
    out = []
    for j in range(len(flat[0])):
        gamma = 1.0 if sum(w * f[j] for w, f in zip(sw, flat, strict=True)) >= 0 else -1.0
        num = den = 0.0
        for w, f in zip(weights, flat, strict=True):
            if f[j] != 0 and math.copysign(1.0, w * f[j]) == gamma:
                num += w * f[j]
                den += w
        out.append((num / den if den != 0 else num) if normalize else num)  # mergekit: divisor 0 -> 1
    return torch.tensor(out, dtype=deltas[0].dtype).view_as(deltas[0])


def _ref_della(d, density, epsilon, u, rescale=True):
    """DELLA MagPrune by hand: per-row ranks by a Python sort, p = density - eps + 2 eps (r-1)/(n-1)."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], -1)
    ur = u.reshape(rows.shape)
    out = torch.zeros_like(rows)
    n = rows.shape[1]
    for i in range(rows.shape[0]):
        v = _flat(rows[i])
        order = sorted(range(n), key=lambda j: abs(v[j]))
        for rank, j in enumerate(order, start=1):
            p = density - epsilon + 2 * epsilon * (rank - 1) / (n - 1)
            out[i, j] = v[j] if float(ur[i, j]) < p else 0.0
    out = out.view_as(d)
    before, after = sum(abs(x) for x in _flat(d)), sum(abs(x) for x in _flat(out))
    return out * (before / after) if rescale and after > 1e-7 else out


@pytest.mark.parametrize("shape", [(6, 7), (40,), (3, 4, 5)])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_matches_formula_with_same_draws(shape, rescale):
    (d,) = _rand(1, seed=21, shape=shape)
    got = M.della(d, 0.5, 0.2, torch.Generator().manual_seed(3), rescale=rescale)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(3))  # the same uniform draws
    torch.testing.assert_close(got, _ref_della(d, 0.5, 0.2, u, rescale))


def test_della_keep_rate_follows_magnitude_rank():
    """Over many seeds the smallest entry of each row is kept with probability density - epsilon, the largest
    with density + epsilon (binomial, 5 sigma)."""
    d = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    density, eps, n = 0.5, 0.3, 400
    smallest, largest = d.abs().argmin(dim=1), d.abs().argmax(dim=1)
    rows = torch.arange(8)
    kept_small = kept_large = 0
    for seed in range(n):
        kept = M.della(d, density, eps, torch.Generator().manual_seed(seed), rescale=False) != 0
        kept_small += int(kept[rows, smallest].sum())
        kept_large += int(kept[rows, largest].sum())
    total = 8 * n
    for rate, p in ((kept_small / total, density - eps), (kept_large / total, density + eps)):
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / total), (rate, p)


@pytest.mark.parametrize(
    "method,normalize", [("ties", True), ("ties", False), ("linear", False), ("linear", True)]
)
def test_della_merge_is_della_then_combine(method, normalize):
    deltas, w = _rand(3, seed=22), [1.0, 0.5, 2.0]
    got = M.della_merge(deltas, [0.4, 0.6, 0.5], 0.1, 7, w, method, normalize=normalize)
    gen = torch.Generator().manual_seed(7)
    us = []
    for _ in deltas:  # deltas 0, 1, 2 draw from one generator in order
        us.append(torch.rand(SHAPE, generator=gen))
    dropped = [_ref_della(d, p, 0.1, u) for d, p, u in zip(deltas, [0.4, 0.6, 0.5], us, strict=True)]
    if method == "ties":
        ref = _ref_disjoint(dropped, w, normalize)
    else:
        ref = sum(wi * x for wi, x in zip(w, dropped, strict=True)) / (sum(w) if normalize else 1.0)
    torch.testing.assert_close(got, ref)


def test_breadcrumbs_ties_is_breadcrumbs_then_sign_election():
    from robustft.merge.registry import METHODS

    base, *fts = _rand(4, seed=23)
    w = [1.0, 0.7, 1.5]
    deltas = [f - base for f in fts]
    pruned = []
    for d in deltas:  # keep density 0.5 after the 10% largest magnitudes (mergekit's gamma), by a Python sort
        v = _flat(d)
        order = sorted(range(len(v)), key=lambda j: abs(v[j]))
        keep = set(order[len(v) - int(0.5 * len(v)) - int(0.1 * len(v)) : len(v) - int(0.1 * len(v))])
        pruned.append(
            torch.tensor([x if j in keep else 0.0 for j, x in enumerate(v)], dtype=d.dtype).view_as(d)
        )
    spec = METHODS["breadcrumbs_ties"]
    for normalize in (False, True):
        got = spec.apply(base.clone(), [f.clone() for f in fts],
                         {"lambda": 0.8, "normalize": normalize, "rescale": False},
                         [{"weight": wi, "density": 0.5, "gamma": 0.1} for wi in w])  # fmt: skip
        torch.testing.assert_close(got, base + 0.8 * _ref_disjoint(pruned, w, normalize))


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_formula(select_topk):
    deltas = _rand(3, seed=24)
    flat = [_flat(d) for d in deltas]
    n = len(flat[0])
    var = [sum((f[j] - sum(g[j] for g in flat) / 3) ** 2 for f in flat) / 3 for j in range(n)]
    k = int(sum(v != 0 for v in var) * select_topk)
    keep = set(sorted(range(n), key=lambda j: var[j], reverse=True)[:k]) if select_topk < 1 else set(range(n))
    sel = [[f[j] if j in keep else 0.0 for j in range(n)] for f in flat]
    energy = [sum(x * x for x in s) / n for s in sel]
    w = [e / sum(energy) for e in energy]
    out = []
    for j in range(n):
        gamma = 1.0 if sum(s[j] for s in sel) >= 0 else -1.0
        agree = [
            (wi, s[j]) for wi, s in zip(w, sel, strict=True) if s[j] != 0 and math.copysign(1, s[j]) == gamma
        ]
        out.append(sum(wi * x for wi, x in agree) / max(sum(wi for wi, _ in agree), 1e-6))
    torch.testing.assert_close(M.sce(deltas, select_topk), torch.tensor(out, dtype=torch.float64).view(SHAPE))


def _sparse_deltas(seed):
    """Task vectors with many entries below epsilon, so RAM sees 0, 1, 2 and 3 contributors."""
    deltas = _rand(3, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [d * (torch.rand(SHAPE, generator=g, dtype=torch.float64) < 0.5) for d in deltas]


def test_ram_and_ramplus_match_formula():
    deltas = _sparse_deltas(25)
    eps, r, alpha = 1e-5, 0.5, 0.4
    flat = [_flat(d) for d in deltas]
    n = len(flat[0])
    count = [sum(abs(f[j]) > eps for f in flat) for j in range(n)]
    ram = [sum(f[j] for f in flat if abs(f[j]) > eps) / max(count[j], 1) for j in range(n)]
    torch.testing.assert_close(M.ram(deltas, eps), torch.tensor(ram, dtype=torch.float64).view(SHAPE))
    lam = []
    for f in flat:
        unique = sum(abs(f[j]) > eps and count[j] == 1 for j in range(n))
        shared = sum(abs(f[j]) > eps and count[j] > 1 for j in range(n))
        lam.append(1 + r * min(max(shared / max(unique, eps), 0), alpha))
    plus = [
        sum((lam[i] if count[j] == 1 else 1 / count[j]) * f[j] for i, f in enumerate(flat) if abs(f[j]) > eps)
        for j in range(n)
    ]
    got = M.ramplus_tl(deltas, eps, r, alpha)
    torch.testing.assert_close(got, torch.tensor(plus, dtype=torch.float64).view(SHAPE))
    assert any(c == 1 for c in count) and any(c > 1 for c in count) and any(c == 0 for c in count)


def test_nearswap_matches_formula():
    base, model = _rand(2, seed=26)
    t = 0.7
    ref = []
    for a, b in zip(_flat(base), _flat(model), strict=True):
        w = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        ref.append(w * b + (1 - w) * a)
    torch.testing.assert_close(M.nearswap(base, model, t), torch.tensor(ref, dtype=torch.float64).view(SHAPE))


@pytest.mark.parametrize("shape", [(6, 7), (50,)])
def test_arcee_fusion_matches_formula(shape):
    base, noise = _rand(2, seed=27, shape=shape)
    g = torch.Generator().manual_seed(1)
    model = base + noise * (torch.rand(shape, generator=g, dtype=torch.float64) ** 4)  # a few large changes
    rows_b = base.reshape(-1, shape[-1]).tolist()
    rows_m = model.reshape(-1, shape[-1]).tolist()
    importance = []
    for rb, rm in zip(rows_b, rows_m, strict=True):
        zb, zm = sum(math.exp(x) for x in rb), sum(math.exp(x) for x in rm)
        p = [math.exp(x) / zm + 1e-8 for x in rm]
        q = [math.exp(x) / zb + 1e-8 for x in rb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        importance += [abs(m - b) * kl for m, b in zip(rm, rb, strict=True)]
    s = sorted(importance)
    q1, med, q3 = (s[math.floor(x * (len(s) - 1))] for x in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    ref = [
        m if imp >= threshold else b for m, b, imp in zip(_flat(model), _flat(base), importance, strict=True)
    ]
    got = M.arcee_fusion(base, model)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64).view(shape))
    assert 0 < sum(imp >= threshold for imp in importance) < len(importance)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: M.della(d[0], 0.5, 0.5, torch.Generator()), "density \\+/- epsilon"),
        (lambda d: M.della_merge(d, 0.5, 0.1, 0, method="mean"), "method"),
        (lambda d: M.sce(d, 1.5), "select_topk"),
        (lambda d: M.nearswap(d[0], d[1], -1.0), "t must be"),
        (lambda d: M.arcee_fusion(d[0], d[1][:2]), "base\\+model\\[1\\] has shape"),
        (lambda d: M.ram([d[0], d[1][:2]]), "deltas\\[1\\] has shape"),
    ],
)
def test_new_methods_bad_input_names_the_cause(call, match):
    with pytest.raises(ValueError, match=match):
        call(_rand(3))


def test_new_methods_leave_inputs_untouched():
    deltas = _rand(3, seed=28)
    copies = [d.clone() for d in deltas]
    M.della_merge(deltas, 0.5, 0.1, 0)
    M.sce(deltas, 0.5)
    M.ram(deltas)
    M.ramplus_tl(deltas)
    M.nearswap(deltas[0], deltas[1], 0.3)
    M.arcee_fusion(deltas[0], deltas[1])
    for d, c in zip(deltas, copies, strict=True):
        torch.testing.assert_close(d, c, rtol=0, atol=0)


# -- SVD merges (TSV-M, Iso-C, Iso-CTS) against numpy references laid out as the papers / FusionBench: each
# task's top-k singular vectors placed in a zero-padded r-wide block, decorrelated by scipy's polar
# decomposition (the orthogonal Procrustes solution), reassembled ------------------------------------------


def _np_polar(x):
    """Unitary factor W of scipy's polar decomposition x = W P (orthonormal columns; for a wide x, rows)."""
    if x.shape[0] >= x.shape[1]:
        return scipy_linalg.polar(x)[0]
    return scipy_linalg.polar(x.T)[0].T


def _ref_tsv_m(deltas, weights=None, fraction=None, ranks=None):
    """TSV-M densely; ``ranks``: the task matrices' true ranks (a low-rank one keeps its nonzero triplets)."""
    mats = [d.numpy() * (1.0 if weights is None else weights[i]) for i, d in enumerate(deltas)]
    if mats[0].ndim != 2:
        return torch.from_numpy(sum(mats) / len(mats))
    m, n = mats[0].shape
    r = min(m, n)
    k = int(r * (1 / len(mats) if fraction is None else fraction))
    u_all, s_all, vt_all = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    used = 0
    for i, a in enumerate(mats):
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        ki = k if ranks is None else min(k, ranks[i])
        u_all[:, used : used + ki], s_all[used : used + ki], vt_all[used : used + ki] = (
            u[:, :ki],
            s[:ki],
            vt[:ki],
        )
        used += ki
    # zero padding columns have no singular value: leave them out of the polar factor
    out = _np_polar(u_all[:, :used]) @ np.diag(s_all[:used]) @ _np_polar(vt_all[:used])
    return torch.from_numpy(out)


def _ref_iso_c(deltas):
    total = sum(d.numpy() for d in deltas)
    if total.ndim != 2:
        return torch.from_numpy(total / len(deltas))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return torch.from_numpy(u @ np.diag(np.full_like(s, s.mean())) @ vt)


def _ref_iso_cts(deltas, fraction):
    mats = [d.numpy() for d in deltas]
    total, t = sum(mats), len(mats)
    r = min(total.shape)
    k_task = min(round((r - int(r * fraction)) / t), r // t)
    k_common = r - t * k_task
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    uc = u[:, :k_common]
    blocks_u, blocks_s, blocks_v = [uc], [s[:k_common]], [vt[:k_common]]
    for a in mats:
        ut, st, vtt = np.linalg.svd(a - uc @ uc.T @ a, full_matrices=False)
        blocks_u.append(ut[:, :k_task])
        blocks_s.append(st[:k_task])
        blocks_v.append(vtt[:k_task])
    u_all, v_all = np.concatenate(blocks_u, axis=1), np.concatenate(blocks_v, axis=0)
    sigma = np.concatenate(blocks_s).mean()
    return torch.from_numpy(sigma * _np_polar(u_all) @ _np_polar(v_all))


@pytest.mark.parametrize("shape", [(6, 7), (9, 4), (8, 8)])
@pytest.mark.parametrize("n,weights", [(1, None), (2, None), (3, None), (3, [0.5, 1.0, 2.0])])
def test_tsv_m_matches_dense_reference(shape, n, weights):
    deltas = _rand(n, seed=40 + n, shape=shape)
    torch.testing.assert_close(M.tsv_merge(deltas, weights), _ref_tsv_m(deltas, weights))


def test_tsv_m_one_task_full_rank_is_the_task_vector():
    delta = _rand(1, seed=41)[0]
    torch.testing.assert_close(M.tsv_merge([delta], sv_reduction=1.0), delta)
    torch.testing.assert_close(M.tsv_merge([delta]), delta)  # default fraction 1/T = 1


def test_tsv_m_of_a_matrix_thinner_than_the_task_count_is_zero():
    deltas = _rand(3, seed=51, shape=(2, 9))  # r = 2 < T = 3: k = floor(2 / 3) = 0, as FusionBench
    torch.testing.assert_close(M.tsv_merge(deltas), _ref_tsv_m(deltas))
    assert not M.tsv_merge(deltas).any()


def test_tsv_m_keeps_each_tasks_top_singular_values_on_orthonormal_bases():
    """U_perp, V_perp orthonormal => the merged matrix's singular values are exactly the T k kept ones."""
    deltas = _rand(3, seed=42, shape=(12, 10))
    merged = M.tsv_merge(deltas, sv_reduction=0.2)
    kept = torch.cat([torch.linalg.svdvals(d)[:2] for d in deltas])  # k = floor(0.2 * 10) = 2
    got = torch.linalg.svdvals(merged)
    torch.testing.assert_close(got[:6], kept.sort(descending=True).values)
    torch.testing.assert_close(got[6:], torch.zeros(4, dtype=got.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(merged, _ref_tsv_m(deltas, fraction=0.2))


def test_tsv_m_of_low_rank_task_matrices_keeps_their_nonzero_triplets_only():
    """Ranks 2, 3, 1 < k = floor(12 / 3) = 4 (LoRA deltas): the null-space vectors of LAPACK are arbitrary,
    so the merge is defined by the nonzero triplets and does not move when the inputs move by 1e-15."""
    g = torch.Generator().manual_seed(44)
    deltas = [
        torch.randn(14, r, generator=g, dtype=torch.float64)
        @ torch.randn(r, 12, generator=g, dtype=torch.float64)
        for r in (2, 3, 1)
    ]
    weights = [1.0, 0.7, -0.5]
    merged = M.tsv_merge(deltas, weights)
    torch.testing.assert_close(merged, _ref_tsv_m(deltas, weights, ranks=[2, 3, 1]))
    noisy = [d + 1e-15 * torch.randn(d.shape, generator=g, dtype=torch.float64) for d in deltas]
    torch.testing.assert_close(M.tsv_merge(noisy, weights), merged, atol=1e-9, rtol=1e-9)
    assert not M.tsv_merge([torch.zeros(4, 5), torch.zeros(4, 5)]).any()


@pytest.mark.parametrize("shape", [(6, 7), (9, 4)])
def test_iso_c_flattens_the_spectrum_of_the_sum(shape):
    deltas = _rand(3, seed=43, shape=shape)
    merged = M.iso_c(deltas)
    torch.testing.assert_close(merged, _ref_iso_c(deltas))
    sigma = torch.linalg.svdvals(sum(deltas))
    torch.testing.assert_close(torch.linalg.svdvals(merged), sigma.mean().expand(min(shape)))


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("n,shape", [(2, (12, 10)), (3, (10, 16)), (5, (40, 9))])
def test_iso_cts_matches_dense_reference(fraction, n, shape):
    deltas = _rand(n, seed=44 + n, shape=shape)
    merged = M.iso_cts(deltas, fraction)
    torch.testing.assert_close(merged, _ref_iso_cts(deltas, fraction))
    # isotropic, full rank r, and the common subspace (top k_common of the sum) lies in its column space
    sv = torch.linalg.svdvals(merged)
    torch.testing.assert_close(sv, sv[0].expand(min(shape)))
    k_common, k_task = M.iso_cts_sizes(min(shape), n, fraction)
    assert k_common + n * k_task == min(shape) and k_common >= 0
    uc = torch.linalg.svd(sum(deltas))[0][:, :k_common]
    q = torch.linalg.svd(merged, full_matrices=False)[0]
    torch.testing.assert_close(q @ (q.T @ uc), uc)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    deltas = _rand(3, seed=48)
    torch.testing.assert_close(M.iso_cts(deltas, 1.0), M.iso_c(deltas))


def test_iso_cts_sizes_fill_the_rank_where_rounding_overshoots():
    # r = 9, T = 5, f = 0.2: round((9 - 1) / 5) * 5 = 10 > 9 (FusionBench 0.2.33 raises there)
    assert M.iso_cts_sizes(9, 5, 0.2) == (4, 1)
    for r in range(1, 30):
        for t in range(1, 7):
            for f in (0.0, 0.1, 0.25, 0.5, 0.8, 1.0):
                kc, kt = M.iso_cts_sizes(r, t, f)
                assert kc + t * kt == r and kc >= 0 and kt >= 0


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_svd_merges_average_tensors_that_are_not_matrices(shape):
    deltas = _rand(3, seed=49, shape=shape)
    mean = sum(deltas) / 3
    for got in (M.tsv_merge(deltas), M.iso_c(deltas), M.iso_cts(deltas)):
        torch.testing.assert_close(got, mean)
    torch.testing.assert_close(
        M.tsv_merge(deltas, [1.0, 2.0, 3.0]), (deltas[0] + 2 * deltas[1] + 3 * deltas[2]) / 3
    )


def test_svd_merges_keep_the_dtype_and_leave_inputs_untouched():
    deltas = [d.to(torch.bfloat16) for d in _rand(2, seed=50)]
    copies = [d.clone() for d in deltas]
    for fn in (M.tsv_merge, M.iso_c, M.iso_cts):
        out = fn(deltas)
        assert out.dtype == torch.bfloat16 and out.shape == deltas[0].shape
    for d, c in zip(deltas, copies, strict=True):
        torch.testing.assert_close(d, c, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: M.tsv_merge(d, sv_reduction=0.5), r"sv_reduction must be in \(0, 1/T\]"),
        (lambda d: M.tsv_merge(d, sv_reduction=0.0), "sv_reduction"),
        (lambda d: M.iso_cts(d, 1.5), r"common_space_fraction must be in \[0, 1\]"),
        (lambda d: M.iso_c([d[0], d[1][:2]]), r"deltas\[1\] has shape"),
        (lambda d: M.tsv_merge(d, weights=[1.0]), "1 weights for 3 tensors"),
    ],
)
def test_svd_merges_bad_input_names_the_cause(call, match):
    with pytest.raises(ValueError, match=match):
        call(_rand(3))


def test_pack_mask_is_numpy_packbits_little_and_round_trips():
    g = torch.Generator().manual_seed(3)
    for shape in [(1,), (8,), (3, 7), (5, 4, 3), (0,)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = M.pack_mask(mask)
        ref = np.packbits(mask.numpy().reshape(-1), bitorder="little")
        assert packed.dtype == torch.uint8 and packed.tolist() == ref.tolist()
        assert torch.equal(M.unpack_mask(packed, shape), mask)
    with pytest.raises(ValueError, match="boolean"):
        M.pack_mask(torch.ones(3))
    with pytest.raises(ValueError, match="2 uint8 bytes for shape"):
        M.unpack_mask(torch.zeros(3, dtype=torch.uint8), (3, 4))


def test_tall_compress_and_reconstruct_follow_the_paper_entry_by_entry():
    """theta_t = theta_0 + m_t * tau_MTL, m_t = 1{|tau_t| >= lambda_t |tau_MTL - tau_t|} (Wang et al.)."""
    base = _rand(1, seed=20)[0]
    deltas = _rand(3, seed=21)
    lams = [0.2, 0.6, 1.0]
    mtl, masks = M.tall_compress(deltas, lams)
    for t, lam in enumerate(lams):
        rec = M.tall_reconstruct(base, mtl, masks[t])
        for idx in range(base.numel()):
            vals = [float(d.reshape(-1)[idx]) for d in deltas]
            total = sum(vals)
            keep = abs(vals[t]) >= lam * abs(total - vals[t])
            want = float(base.reshape(-1)[idx]) + (total if keep else 0.0)
            assert float(rec.reshape(-1)[idx]) == pytest.approx(want, abs=1e-12)
    # one task: tau_MTL = tau_1, the mask keeps everything, the model comes back exactly
    mtl1, (m1,) = M.tall_compress(deltas[:1])
    assert bool(m1.all()) and torch.equal(M.tall_reconstruct(base, mtl1, m1), base + deltas[0])
    with pytest.raises(ValueError, match="base, mtl, mask"):
        M.tall_reconstruct(base, mtl, masks[0][:2])
