"""robustft.ops.perturb against dense formulas computed here."""

from __future__ import annotations

import math

import pytest
import torch

from robustft.ops.perturb import (
    flat_row_sq_norms,
    global_norm,
    low_rank_merged_row_sq_norms,
    low_rank_tangent,
    low_rank_tangent_sq_norm,
    mgpo_factor,
    mgpo_grad_ema,
    momentum_epsilon,
    noise_seed,
    perturb_,
    row_noise,
    row_sq_norms,
    rwp_row_scale,
    sam_perturbation,
    scheduled_rho,
    seeded_normal,
    unperturb_,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (7,), (3, 2, 4)]
    w = [torch.randn(s, generator=g) for s in shapes]
    gr = [torch.randn(s, generator=g) for s in shapes]
    return w, gr


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_sam_perturbation_is_the_dense_formula(adaptive, eta):
    w, g = _tensors()
    eps = sam_perturbation(w, g, rho=0.1, adaptive=adaptive, eta=eta)
    wf, gf = _flat(w).double(), _flat(g).double()
    t = (wf.abs() + eta) if adaptive else torch.ones_like(wf)
    expected = 0.1 * t * t * gf / (torch.linalg.vector_norm(t * gf) + 1e-12)
    torch.testing.assert_close(_flat(eps).double(), expected, rtol=1e-6, atol=1e-9)
    if not adaptive:
        assert _flat(eps).norm().item() == pytest.approx(0.1, rel=1e-6)
        # first-order ascent: eps is the maximiser of <g, e> on the rho-sphere (beats random directions)
        for _ in range(5):
            r = torch.randn_like(gf)
            assert (gf @ (0.1 * r / r.norm())).item() <= (gf @ _flat(eps).double()).item()


@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.01)])
def test_float64_tensors_are_perturbed_in_float64(adaptive, eta):
    """float64 weights/gradients: ε, norms and row norms equal the float64 dense formula to float64
    precision (a float32 computation is off by ~1e-8 relative); float32 inputs still give float32."""
    w, g = _tensors()
    w, g = [x.double() for x in w], [x.double() for x in g]
    eps = sam_perturbation(w, g, rho=0.1, adaptive=adaptive, eta=eta)
    wf, gf = _flat(w), _flat(g)
    t = (wf.abs() + eta) if adaptive else torch.ones_like(wf)
    expected = 0.1 * t * t * gf / (torch.linalg.vector_norm(t * gf) + 1e-12)
    assert all(e.dtype == torch.float64 for e in eps)
    torch.testing.assert_close(_flat(eps), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(global_norm(g), torch.linalg.vector_norm(gf), rtol=1e-15, atol=0)
    norm = global_norm(g)
    msam = momentum_epsilon(g[0], 0.1, norm)
    torch.testing.assert_close(msam, -0.1 * g[0] / (norm + 1e-12), rtol=1e-15, atol=0)
    torch.testing.assert_close(row_sq_norms(w[0]), (w[0] ** 2).sum(dim=1), rtol=1e-15, atol=0)
    flat = w[2].reshape(-1)
    tail = flat_row_sq_norms(flat[8:], w[2].shape, 8)  # rows 1 and 2 whole: offset 8 starts row 1
    torch.testing.assert_close(tail[1:], (w[2] ** 2).sum(dim=(1, 2))[1:], rtol=1e-15, atol=0)
    assert sam_perturbation([x.float() for x in w], [x.float() for x in g], 0.1)[0].dtype == torch.float32


def test_float64_noise_undo_is_bit_exact():
    w = torch.randn(6, 5, dtype=torch.float64)
    e = row_noise(w.shape, rwp_row_scale(row_sq_norms(w), w.shape, 0.05), seed=3, dtype=torch.float64)
    assert e.dtype == torch.float64
    before = w.clone()
    fixup = perturb_(w, e)
    unperturb_(w, e, fixup)
    assert torch.equal(w.view(torch.int64), before.view(torch.int64))


def test_sam_perturbation_ignores_gradient_scale_and_missing_grads():
    w, g = _tensors()
    a = sam_perturbation(w, g, 0.05)
    b = sam_perturbation(w, [x * 0.01 for x in g], 0.05)  # e.g. clipped by global norm
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-5, atol=1e-8)
    c = sam_perturbation(w, [g[0], None, g[2]], 0.05)
    assert torch.count_nonzero(c[1]) == 0
    expected = 0.05 * torch.cat([g[0].reshape(-1), g[2].reshape(-1)])
    expected = expected / torch.cat([g[0].reshape(-1), g[2].reshape(-1)]).norm()
    torch.testing.assert_close(torch.cat([c[0].reshape(-1), c[2].reshape(-1)]), expected)


def test_global_norm_reduce_hook_gives_the_full_norm_of_shards():
    full = torch.randn(10, 4)
    shard_a, shard_b = full[:5], full[5:]
    other = shard_b.pow(2).sum()
    norm_a = global_norm([shard_a], reduce=lambda sq: sq + other)  # what an all-reduce over 2 ranks gives
    assert norm_a.item() == pytest.approx(full.norm().item(), rel=1e-6)


def test_momentum_epsilon_points_against_momentum_with_radius_rho():
    m = [torch.randn(4, 3), torch.randn(3)]
    norm = global_norm(m)
    e = [momentum_epsilon(x, 0.3, norm) for x in m]
    expected = -0.3 * _flat(m) / _flat(m).norm()
    torch.testing.assert_close(_flat(e), expected)


def test_row_scales_are_the_dense_formulas():
    w = torch.randn(6, 10)
    sq = row_sq_norms(w)
    torch.testing.assert_close(sq, torch.stack([(r**2).sum() for r in w]))
    rwp = rwp_row_scale(sq, w.shape, 0.05)
    torch.testing.assert_close(rwp, 0.05 * w.norm(dim=1) / math.sqrt(10))
    conv = torch.randn(4, 3, 2, 2)  # a filter per output channel
    torch.testing.assert_close(row_sq_norms(conv), conv.reshape(4, -1).pow(2).sum(1))
    torch.testing.assert_close(row_sq_norms(torch.tensor([3.0, 4.0])), torch.tensor([25.0]))


def test_row_noise_is_regenerated_from_the_seed_and_has_the_row_std():
    scale = torch.tensor([0.1, 1.0, 3.0])
    a = row_noise(torch.Size((3, 20000)), scale, seed=noise_seed(1, 7, 2))
    b = row_noise(torch.Size((3, 20000)), scale, seed=noise_seed(1, 7, 2))
    c = row_noise(torch.Size((3, 20000)), scale, seed=noise_seed(1, 8, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.std(dim=1), scale, rtol=0.03, atol=0)
    assert len({noise_seed(s, t, i) for s in range(3) for t in range(3) for i in range(3)}) == 27


@pytest.mark.parametrize("shape", [(7, 5), (6, 2, 3), (23,), (1,), (3, 40)])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_flat_slices_give_row_norms_and_row_noise_of_the_whole_tensor(shape, parts):
    """ZeRO-3 layout: rank r holds [r·P, (r+1)·P) of the flattened tensor, the last slices short or
    empty. The slices' row-norm shares add up to the dense row norms, and scaling each slice by rows
    equals indexing a per-element row map built densely here."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat, n = t.reshape(-1), t.numel()
    n_rows = shape[0] if len(shape) > 1 else 1
    row_of = torch.arange(n) // (n // n_rows)  # row of each element of the flattened tensor
    size = -(-n // parts)
    slices = [(r * size, max(0, min(size, n - r * size))) for r in range(parts)]
    total = sum(flat_row_sq_norms(flat[o:o + k], t.shape, o) for o, k in slices)
    torch.testing.assert_close(total, row_sq_norms(t), rtol=1e-6, atol=0)
    scale = torch.rand(n_rows, generator=torch.Generator().manual_seed(1)) + 0.5
    for o, k in slices:
        z = row_noise(torch.Size((k,)), torch.ones(1), seed=11 + o)  # the draw, unscaled
        got = row_noise(torch.Size((k,)), scale, seed=11 + o, slice_of=(t.shape, o))
        torch.testing.assert_close(got, z * scale[row_of[o:o + k]], rtol=0, atol=0)
    if len(shape) > 1:  # one slice = the whole tensor: the plain per-row broadcast
        got = row_noise(torch.Size((n,)), scale, seed=5, slice_of=(t.shape, 0))
        torch.testing.assert_close(got.reshape(shape), row_noise(t.shape, scale, seed=5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("sigma", [0.01, 0.5, 5.0])
def test_perturb_then_unperturb_is_bit_exact(dtype, sigma):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 48, generator=g) * 0.05).to(dtype)
    w[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30]).to(dtype)  # signed zeros and tiny values
    original = w.clone()
    e = row_noise(w.shape, rwp_row_scale(row_sq_norms(w), w.shape, sigma), seed=11)
    fix = perturb_(w, e)
    # the weights really moved to fl(w + e)
    expected = (
        (original.double() + e.double()).to(dtype)
        if dtype == torch.float64
        else ((original.float() + e).to(dtype))
    )
    assert torch.equal(w, expected)
    unperturb_(w, e, fix)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[w.element_size()]
    assert torch.equal(w.view(ints), original.view(ints))
    assert fix.numel() < w.numel()


def test_fixups_are_few_for_small_noise_and_work_on_non_contiguous_views():
    base = torch.randn(40, 30) * 0.05
    w = base.t()  # a non-contiguous view
    original = w.clone()
    e = row_noise(w.shape, rwp_row_scale(row_sq_norms(w), w.shape, 0.01), seed=5)
    fix = perturb_(w, e)
    assert fix.numel() / w.numel() < 0.1  # measured ~2.6% at sigma = 0.01
    unperturb_(w, e, fix)
    assert torch.equal(w.view(torch.int32), original.view(torch.int32))


def test_perturb_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        perturb_(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating"):
        perturb_(torch.zeros(3, dtype=torch.long), torch.zeros(3))


def test_scheduled_rho():
    assert scheduled_rho(0.1, "constant", 0, 0, 10) == 0.1
    assert scheduled_rho(0.1, "constant", 1, 2, 10) == 0.0
    assert scheduled_rho(0.1, "linear", 2, 2, 10) == pytest.approx(0.1 / 8)
    assert scheduled_rho(0.1, "linear", 9, 2, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        scheduled_rho(0.1, "cosine", 0, 0, 10)


# -- shrink and perturb ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shrink_perturb_equals_the_dense_formula(dtype):
    from robustft.ops.perturb import noise_seed, shrink_perturb_

    w0 = torch.randn(6, 5).to(dtype)
    seed = noise_seed(3, 7, 1)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed), dtype=wide)  # independent draw
    want = (0.4 * w0.to(wide) + 0.01 * eps).to(dtype)
    got = shrink_perturb_(w0.clone(), 0.4, 0.01, seed)
    assert torch.equal(got, want)


def test_shrink_perturb_noise_is_regenerated_from_the_seed():
    from robustft.ops.perturb import shrink_perturb_

    w = torch.randn(4, 4)
    a, b, c = (shrink_perturb_(w.clone(), 0.5, 0.1, s) for s in (11, 11, 12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(shrink_perturb_(w.clone(), 0.5, 0.0, 11), 0.5 * w)  # σ = 0: shrink only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("out", "inp", "r"), [(6, 9, 1), (24, 16, 4), (3, 40, 8)])
def test_low_rank_merged_row_norms_are_the_dense_formula(dtype, out, inp, r):
    g = torch.Generator().manual_seed(out * inp + r)
    w0, b, a = (torch.randn(s, generator=g, dtype=dtype) for s in ((out, inp), (out, r), (r, inp)))
    got = low_rank_merged_row_sq_norms(w0, 0.7 * b, a)
    want = row_sq_norms(w0 + (0.7 * b) @ a)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_low_rank_merged_row_norms_of_a_cancelling_row_are_not_negative():
    w0, b = torch.tensor([[1.0, -2.0], [3.0, 1.0]]), torch.tensor([[-1.0], [0.0]])
    a = torch.tensor([[1.0, -2.0]])
    got = low_rank_merged_row_sq_norms(w0, b, a)  # row 0: w0 + BA = 0 exactly
    assert got[0] >= 0 and got[0] < 1e-6 and got[1] == pytest.approx(10.0)


def test_low_rank_merged_row_norms_reject_mismatched_factors():
    with pytest.raises(ValueError, match=r"W0 \(4, 5\), B \(4, 2\) and A \(3, 5\)"):
        low_rank_merged_row_sq_norms(torch.zeros(4, 5), torch.zeros(4, 2), torch.zeros(3, 5))


def test_seeded_noise_linear_is_x_times_the_noise_with_its_gradient_and_keeps_no_noise():
    from robustft.ops.perturb import row_noise, seeded_noise_linear

    scale = torch.rand(6) + 0.1
    calls = []

    def make():
        calls.append(1)
        return row_noise(torch.Size((6, 5)), scale, seed=11)

    x = torch.randn(3, 4, 5, requires_grad=True)
    y = seeded_noise_linear(x, make)
    g = torch.randn(3, 4, 6)
    (y * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    eps = make()
    y_ref = torch.nn.functional.linear(x_ref, eps)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert len(calls) == 3  # drawn for the forward, again for the backward (and once for the reference)


def test_low_rank_tangent_is_the_derivative_of_the_product():
    """dB·A + B·dA = d/dt (B + t·dB)(A + t·dA) at t = 0, checked by torch.func.jvp on the dense product."""
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 2), (2, 5), (6, 2), (2, 5)]
    b, a, db, da = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    _, want = torch.func.jvp(lambda x, y: x @ y, (b, a), (db, da))
    torch.testing.assert_close(low_rank_tangent(b, a, db, da), want)
    with pytest.raises(ValueError, match="do not make"):
        low_rank_tangent(b, a, db, da.T)


@pytest.mark.parametrize("out, inp, r", [(6, 5, 2), (40, 3, 4), (3, 50, 1)])
def test_low_rank_tangent_norm_is_the_norm_of_the_dense_tangent(out, inp, r):
    """‖dB·A + B·dA‖² from two 2r × 2r Gram matrices equals the squared norm of the dense product's jvp."""
    g = torch.Generator().manual_seed(out + inp)
    b, db = (torch.randn(out, r, generator=g, dtype=torch.float64) for _ in range(2))
    a, da = (torch.randn(r, inp, generator=g, dtype=torch.float64) for _ in range(2))
    _, dense = torch.func.jvp(lambda x, y: x @ y, (b, a), (db, da))
    torch.testing.assert_close(low_rank_tangent_sq_norm(b, a, db, da), dense.pow(2).sum())
    got32 = low_rank_tangent_sq_norm(b.float(), a.float(), db.float(), da.float())
    assert got32.dtype == torch.float64
    torch.testing.assert_close(got32, dense.pow(2).sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not make"):
        low_rank_tangent_sq_norm(b, a, db, da.T)


def test_noise_drawn_into_a_scratch_buffer_is_the_same_noise():
    """``out=`` only saves the allocation: the same z and the same row noise, bit for bit."""
    scale = torch.tensor([0.5, 2.0, 0.0])
    buf = torch.full((3 * 17,), float("nan"))
    got = row_noise(torch.Size((3, 17)), scale, seed=11, out=buf.view(3, 17))
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, row_noise(torch.Size((3, 17)), scale, seed=11))
    assert torch.equal(seeded_normal((4, 9), 5, out=torch.empty(4, 9)), seeded_normal((4, 9), 5))
    with pytest.raises(ValueError, match="out is"):
        seeded_normal((4, 9), 5, out=torch.empty(9, 4).T)


def test_mgpo_factor_and_grad_ema_follow_the_rule():
    assert mgpo_factor(2.0, None, 0.1) == pytest.approx(-0.05)  # before the first gradient norm: ρ·v/‖v‖
    assert mgpo_factor(2.0, 4.0, 0.1) == pytest.approx(-0.05 / 4)  # divided by ḡ
    assert mgpo_factor(2.0, 1e-3, 0.1) == pytest.approx(-0.05 * 10)  # 1/ḡ capped at 10
    assert mgpo_factor(2.0, 1e-3, 0.1, max_scale=100.0) == pytest.approx(-0.05 * 100)
    ema = mgpo_grad_ema(None, torch.tensor(3.0), 0.9)
    assert ema.item() == 3.0  # started at the first norm
    assert mgpo_grad_ema(ema, torch.tensor(1.0), 0.9).item() == pytest.approx(0.9 * 3 + 0.1 * 1)
