"""LoRA factor algebra against dense references computed here with torch.linalg."""

import pytest
import torch

from robustft.lora.algebra import DeltaSet, LoRADelta, combine, paper_add, paper_negate


def rand_delta(out=24, inn=20, r=4, scale=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(out, r, generator=g, dtype=dtype)
    return LoRADelta(B, torch.randn(r, inn, generator=g, dtype=dtype), scale)


def dense_ref(d):
    return d.scale * d.B.double() @ d.A.double()


def test_sum_negation_scaling_are_exact():
    a, b = rand_delta(seed=1), rand_delta(r=3, scale=2.0, seed=2)
    s = a + b
    assert s.rank == 7
    torch.testing.assert_close(s.dense(), dense_ref(a) + dense_ref(b))
    torch.testing.assert_close((-a).dense(), -dense_ref(a))
    torch.testing.assert_close((a - b).dense(), dense_ref(a) - dense_ref(b))
    torch.testing.assert_close((2.5 * a).dense(), 2.5 * dense_ref(a))
    torch.testing.assert_close((a * -0.3 + b * 1.7).dense(), -0.3 * dense_ref(a) + 1.7 * dense_ref(b))


def test_compress_exact_at_or_above_true_rank():
    g = torch.Generator().manual_seed(3)
    # rank-6 factors whose product has true rank 3
    f64 = torch.float64
    B = torch.randn(30, 3, generator=g, dtype=f64) @ torch.randn(3, 6, generator=g, dtype=f64)
    d = LoRADelta(B, torch.randn(6, 25, generator=g, dtype=torch.float64), 0.7)
    for r in (3, 4, 6, 50):
        c = d.compress(r)
        assert c.rank == min(r, 6)
        torch.testing.assert_close(c.dense(), dense_ref(d), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_compress_matches_dense_truncated_svd(dtype, tol):
    a, b, c = (rand_delta(40, 32, 8, scale, seed, dtype) for scale, seed in ((0.25, 4), (1.0, 5), (2.0, 6)))
    s = a + b - c
    dense = dense_ref(a) + dense_ref(b) - dense_ref(c)
    U, S, Vh = torch.linalg.svd(dense)
    torch.testing.assert_close(s.singular_values().double(), S[:24], atol=tol * S[0], rtol=tol)
    for k in (1, 5, 12):
        ref = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        got = s.compress(k)
        assert got.rank == k and got.B.dtype == dtype
        torch.testing.assert_close(got.dense().double(), ref, atol=tol * S[0], rtol=tol)


def test_half_precision_inputs_are_upcast_for_the_maths():
    d = rand_delta(dtype=torch.bfloat16)
    c = d.compress(2)
    assert c.B.dtype == torch.bfloat16
    ref = torch.linalg.svd(dense_ref(d))
    assert torch.allclose(torch.linalg.svdvals(c.dense().double())[:2], ref.S[:2], rtol=2e-2)


def test_paper_operators_follow_zhang_et_al():
    a, b = rand_delta(seed=7), rand_delta(seed=8)
    lam = 0.3
    add = paper_add([a, b], [lam, 1 - lam])
    ref = a.scale * (lam * a.B + (1 - lam) * b.B) @ (lam * a.A + (1 - lam) * b.A)
    torch.testing.assert_close(add.dense(), ref)
    # not the sum of the deltas (cross terms)
    assert not torch.allclose(add.dense(), lam * dense_ref(a) + (1 - lam) * dense_ref(b))
    neg = paper_negate(a)
    torch.testing.assert_close(neg.B, -a.B)
    torch.testing.assert_close(neg.A, a.A)
    torch.testing.assert_close(neg.dense(), -dense_ref(a))


def test_combine_sets_with_missing_modules_and_paper_method():
    a = DeltaSet(q=rand_delta(seed=1), v=rand_delta(seed=2))
    b = DeltaSet(q=rand_delta(seed=3), o=rand_delta(seed=4))
    out = combine([a, b], [1.0, -0.5])
    assert set(out) == {"q", "v", "o"}
    torch.testing.assert_close(out["q"].dense(), dense_ref(a["q"]) - 0.5 * dense_ref(b["q"]))
    torch.testing.assert_close(out["v"].dense(), dense_ref(a["v"]))
    torch.testing.assert_close(out["o"].dense(), -0.5 * dense_ref(b["o"]))
    assert all(d.scale == 1.0 for d in out.values())
    p = combine([a, b], [1.0, -0.5], method="paper")
    qa, qb = a["q"], b["q"]
    ref = qa.scale * (qa.B - 0.5 * qb.B) @ (qa.A + 0.5 * qb.A)
    torch.testing.assert_close(p["q"].dense(), ref)
    torch.testing.assert_close(p["o"].dense(), -0.25 * dense_ref(b["o"]))


def test_bad_input_is_refused_with_the_module_name():
    a = rand_delta()
    b = LoRADelta(torch.randn(24, 2).double(), torch.randn(2, 21).double(), name="layers.0.q")
    with pytest.raises(ValueError, match="shapes"):
        a + b
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRADelta(torch.randn(4, 2), torch.randn(3, 5), name="x")
    with pytest.raises(ValueError, match="positive integer"):
        a.compress(0)
    with pytest.raises(ValueError, match="scales"):
        paper_add([a, a * 2.0])
    with pytest.raises(ValueError, match="unknown method"):
        combine([DeltaSet(q=a)], method="ties")
    with pytest.raises(ValueError, match="2 weights for 1"):
        combine([DeltaSet(q=a)], [1, 2])


def test_combine_dense_refactors_the_merged_matrix():
    from robustft.lora.algebra import combine_dense, factorize

    a = DeltaSet(q=rand_delta(seed=1), v=rand_delta(seed=2))
    b = DeltaSet(q=rand_delta(seed=3))

    names = []

    def clipped_sum(dense, weights, name):  # a non-linear, element-wise merge
        names.append(name)
        return sum(w * d for w, d in zip(weights, dense, strict=True)).clamp(-1, 1)

    out, errors = combine_dense([a, b], clipped_sum, rank=3, weights=[1.0, 2.0])
    assert names == ["q.weight", "v.weight"]
    ref_q = (dense_ref(a["q"]) + 2 * dense_ref(b["q"])).clamp(-1, 1)
    U, S, Vh = torch.linalg.svd(ref_q)
    truncated = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close(out["q"].dense(), truncated)
    assert out["q"].rank == 3
    # the reported error is ‖ΔW − ΔW_3‖_F / ‖ΔW‖_F of the merged matrix
    assert errors["q"] == pytest.approx(float((ref_q - truncated).norm() / ref_q.norm()), rel=1e-9)
    assert 0 < errors["q"] < 1 and errors["v"] > 0
    # exact when the rank allows it
    torch.testing.assert_close(factorize(dense_ref(a["v"]), 4).dense(), dense_ref(a["v"]))
    with pytest.raises(ValueError, match="rank must be"):
        factorize(dense_ref(a["v"]), 0)


def test_lora_bias_follows_the_algebra_exactly():
    """Δb = s·b (PEFT lora_bias) sums, negates, scales and survives compression exactly."""
    a = LoRADelta(
        rand_delta(seed=1).B, rand_delta(seed=1).A, 0.5, "q", torch.arange(24.0, dtype=torch.float64)
    )
    b = rand_delta(r=3, scale=2.0, seed=2)  # no bias: zero
    combined = combine([DeltaSet(q=a), DeltaSet(q=b)], [2.0, -1.0])["q"]
    torch.testing.assert_close(combined.dense(), 2 * a.dense() - b.dense())
    torch.testing.assert_close(combined.dense_bias(), 2 * 0.5 * torch.arange(24.0, dtype=torch.float64))
    torch.testing.assert_close((-a).dense_bias(), -a.dense_bias())
    torch.testing.assert_close(combined.compress(2).dense_bias(), combined.dense_bias())
    paper = paper_add([a, paper_negate(a)], [0.3, 0.7])  # the paper's λ on lora_B's parameters, bias too
    torch.testing.assert_close(paper.dense_bias(), (0.3 - 0.7) * a.dense_bias())
    assert b.dense_bias() is None
    with pytest.raises(ValueError, match="q: the LoRA bias"):
        LoRADelta(a.B, a.A, 1.0, "q", torch.zeros(3))
