"""MC-SMoE's pure maths (robustft/ops/experts.py) against brute force and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustft.ops.experts import dominant_experts, group_experts, low_rank, merge_groups, routing_frequency


def test_frequency_dominance_and_groups_by_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5, generator=g)
    idx = logits.topk(2, dim=-1).indices
    freq = routing_frequency(idx, 5)
    counts = [sum(int(e in row.tolist()) for row in idx) for e in range(5)]
    assert freq.tolist() == pytest.approx([c / 80 for c in counts])
    dom = dominant_experts(freq, 2)
    assert dom == sorted(range(5), key=lambda e: (-counts[e], e))[:2]
    groups = group_experts(logits, dom)
    for e in range(5):
        cos = torch.nn.functional.cosine_similarity
        sims = {d: float(cos(logits[:, e], logits[:, d], dim=0)) for d in dom}
        assert groups[e] == (e if e in dom else max(sims, key=sims.get))


def test_merge_groups_is_the_frequency_weighted_mean():
    w = torch.randn(4, 3, 2)
    freq = torch.tensor([0.5, 0.1, 0.4, 0.0])
    merged = merge_groups(w, [0, 0, 2, 2], freq)
    torch.testing.assert_close(merged[0], (0.5 * w[0] + 0.1 * w[1]) / 0.6)
    torch.testing.assert_close(merged[2], w[2])  # expert 3 was never routed to: weight 0
    torch.testing.assert_close(merge_groups(w, [0, 0, 0, 0], torch.zeros(4))[0], w.mean(0))


def test_low_rank_is_eckart_young():
    m = torch.randn(6, 5, dtype=torch.float64)
    u, s, vh = np.linalg.svd(m.numpy())
    torch.testing.assert_close(low_rank(m, 2), torch.from_numpy((u[:, :2] * s[:2]) @ vh[:2]))
    torch.testing.assert_close(low_rank(m, 9), m)
