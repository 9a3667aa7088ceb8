import itertools

import numpy as np
import pytest
import torch

from robustft.ops.bootstrap import bootstrap_means, paired_bootstrap, percentile_interval


def test_constant_differences_give_a_zero_width_interval():
    a = torch.randn(50, dtype=torch.float64)
    out = paired_bootstrap(a + 0.25, a, resamples=500)
    assert out.n == 50 and out.excludes_zero
    assert out.difference == pytest.approx(0.25, abs=1e-12)
    assert out.low == pytest.approx(0.25, abs=1e-12) and out.high == pytest.approx(0.25, abs=1e-12)


def test_percentile_matches_numpy():
    samples = torch.randn(1001, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for c in (0.5, 0.9, 0.95):
        want = np.percentile(samples.numpy(), [100 * (1 - c) / 2, 100 * (1 + c) / 2])
        np.testing.assert_allclose(percentile_interval(samples, c), want, rtol=0, atol=1e-12)


def test_resampled_means_follow_the_exact_bootstrap_distribution():
    """4 items: all 4^4 equally likely resamples enumerated; the sampler's quantiles converge to them."""
    d = torch.tensor([0.0, 1.0, 3.0, 10.0], dtype=torch.float64)
    exact = np.array([np.mean(c) for c in itertools.product(d.tolist(), repeat=4)])
    means = bootstrap_means(d, resamples=200_000, seed=1)
    assert means.mean().item() == pytest.approx(exact.mean(), abs=0.02)
    assert means.var().item() == pytest.approx(exact.var(), rel=0.02)
    for q in (0.025, 0.5, 0.975):
        want = np.quantile(exact, q)  # the exact distribution's quantile
        assert np.mean(means.numpy() <= want + 1e-9) >= q - 0.005
        assert np.mean(means.numpy() < want - 1e-9) <= q + 0.005


def test_coverage_on_normal_data_is_near_nominal():
    """Over 200 seeds, the 90% interval of the mean of 60 paired N(0.3, 1) differences covers 0.3 ≈ 90%."""
    g = torch.Generator().manual_seed(0)
    hits = 0
    for seed in range(200):
        b = torch.randn(60, generator=g, dtype=torch.float64)
        a = b + 0.3 + torch.randn(60, generator=g, dtype=torch.float64)
        out = paired_bootstrap(a, b, resamples=300, confidence=0.9, seed=seed)
        hits += out.low <= 0.3 <= out.high
    assert 0.83 <= hits / 200 <= 0.96  # binomial sd 2.1 points; the percentile interval runs a little narrow


def test_seeded_and_checked():
    a, b = torch.randn(30).tolist(), torch.randn(30).tolist()
    assert paired_bootstrap(a, b, seed=4) == paired_bootstrap(a, b, seed=4)
    assert paired_bootstrap(a, b, seed=4) != paired_bootstrap(a, b, seed=5)
    with pytest.raises(ValueError, match="30 scores against 29"):
        paired_bootstrap(a, b[:29])
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(a, b, confidence=1.0)
    assert paired_bootstrap([2.0, 1.0], [1.0, 0.0]).format(2) == "+1.00 [+1.00, +1.00]"
