"""Paired bootstrap intervals: is the difference between two methods scored on the same items more than noise?

Two models are scored item by item on one eval set (per-example correctness, per-sequence loss). The
difference of their means is estimated from the per-item differences d_i = a_i − b_i; resampling the items
with replacement (the same items for both, hence "paired") gives the distribution of the mean difference,
and the percentile interval is its (1−c)/2 and (1+c)/2 quantiles (Efron & Tibshirani, 1993, ch. 13).
Seeded, so a table is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robustft.checks import check_count, check_fraction, check_integer

__all__ = ["BootstrapInterval", "bootstrap_means", "paired_bootstrap", "percentile_interval"]


@dataclass(frozen=True)
class BootstrapInterval:
    """The mean difference over ``n`` paired items and its percentile interval at ``confidence``."""

    difference: float
    low: float
    high: float
    n: int
    confidence: float
    resamples: int

    def format(self, digits: int = 4) -> str:
        """``+0.1234 [+0.0500, +0.2000]``: the difference and its interval, signs shown."""
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (the difference is outside the noise)."""
        return self.low > 0 or self.high < 0


def _differences(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """a − b as a float64 vector; a ValueError when the two score lists are not paired item by item."""
    ta = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    tb = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if ta.numel() != tb.numel():
        raise ValueError(f"paired_bootstrap: {ta.numel()} scores against {tb.numel()}: the two lists must "
                         "score the same items")
    if ta.numel() == 0:
        raise ValueError("paired_bootstrap: no items to resample")
    d = ta - tb
    if not torch.isfinite(d).all():
        bad = int((~torch.isfinite(d)).sum())
        raise ValueError(f"paired_bootstrap: {bad} non-finite per-item differences")
    return d


def bootstrap_means(values: torch.Tensor, resamples: int = 2000, seed: int = 0) -> torch.Tensor:
    """Means of ``resamples`` resamples (with replacement, each the size of ``values``) of a 1-D tensor."""
    check_count("resamples", resamples)
    check_integer("seed", seed)
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    n = values.numel()
    means = torch.empty(resamples, dtype=values.dtype)
    chunk = max(1, 2**22 // max(n, 1))  # at most ~4M indices at a time
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        idx = torch.randint(n, (size, n), generator=generator)
        means[start:start + size] = values[idx].mean(dim=1)
    return means


def percentile_interval(samples: torch.Tensor, confidence: float = 0.95) -> tuple[float, float]:
    """The (1−c)/2 and (1+c)/2 quantiles of ``samples`` (linear interpolation, numpy's default)."""
    c = check_fraction("confidence", confidence, lower_open=True, upper_open=True)
    q = torch.tensor([(1 - c) / 2, (1 + c) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples, q).tolist()
    return low, high


def paired_bootstrap(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """mean(a − b) over paired items with its percentile bootstrap interval (``resamples`` resamples, seeded).

    ``a[i]`` and ``b[i]`` score the same item i (two models on one eval set). Differences that are
    all equal give a zero-width interval; one item gives its own difference.
    """
    d = _differences(a, b)
    means = bootstrap_means(d, resamples, seed)
    low, high = percentile_interval(means, confidence)
    return BootstrapInterval(float(d.mean()), low, high, int(d.numel()), float(confidence), int(resamples))
