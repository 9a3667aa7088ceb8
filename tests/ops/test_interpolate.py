import math

import pytest
import torch

from robustft.merge.registry import METHODS
from robustft.ops.interpolate import (
    check_alpha,
    interpolate,
    interpolate_end_,
    interpolate_into_,
    karcher_mean,
    lerp,
    multislerp,
    slerp,
    slerp_iterated,
)


def _pair(seed=0, shape=(7, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.37, 0.5, 1.0])
def test_lerp_matches_dense_formula(alpha):
    s, e = _pair()
    ref = (1 - alpha) * s.double() + alpha * e.double()
    torch.testing.assert_close(lerp(s, e, alpha).double(), ref, rtol=0, atol=1e-6)


def test_endpoints_are_bit_exact_for_every_path():
    s, e = _pair()
    for method in ("linear", "slerp"):
        out0 = interpolate([s], [e], 0.0, method=method)[0]
        out1 = interpolate([s], [e], 1.0, method=method)[0]
        assert torch.equal(out0, s) and torch.equal(out1, e), method
        o = [torch.empty_like(s)]
        interpolate_into_(o, [s], [e], 0.0, method=method)
        assert torch.equal(o[0], s)
        interpolate_into_(o, [s], [e], 1.0, method=method)
        assert torch.equal(o[0], e)
    sb, eb = s.bfloat16(), e.bfloat16()
    assert torch.equal(lerp(sb, eb, 0.0), sb) and torch.equal(lerp(sb, eb, 1.0), eb)


@pytest.mark.parametrize("method", ["linear", "slerp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_path_gives_the_same_bits(method, dtype):
    """interpolate, interpolate_into_ (fresh output), interpolate_end_ (in place) and an fp32 upcast
    rounded back (what the merge engine does) are one function: identical bits."""
    starts = [_pair(i)[0].to(dtype) for i in range(4)]
    ends = [_pair(i)[1].to(dtype) for i in range(4)]
    for alpha in (0.1, 0.3, 0.5, 0.77, 1.0):
        ref = interpolate(starts, ends, alpha, method=method)
        into = [torch.empty_like(t) for t in starts]
        interpolate_into_(into, starts, ends, alpha, method=method)
        live = [e.clone() for e in ends]
        interpolate_end_(live, starts, alpha, method=method)
        fn = lerp if method == "linear" else slerp
        work = torch.float64 if dtype == torch.float64 else torch.float32
        upcast = [fn(s.to(work), e.to(work), alpha).to(dtype) for s, e in zip(starts, ends, strict=True)]
        for r, a, b, c in zip(ref, into, live, upcast, strict=True):
            assert r.dtype == dtype
            assert torch.equal(r, a) and torch.equal(r, b) and torch.equal(r, c), (alpha, dtype)


def test_slerp_matches_the_dense_formula():
    s, e = _pair(15, (3, 4))
    t = 0.3
    fs, fe = s.double().reshape(-1), e.double().reshape(-1)
    om = math.acos((fs @ fe / (fs.norm() * fe.norm())).item())
    ref = (math.sin((1 - t) * om) * fs + math.sin(t * om) * fe) / math.sin(om)
    torch.testing.assert_close(slerp(s.double(), e.double(), t).reshape(-1), ref)
    torch.testing.assert_close(slerp(s, e, t).reshape(-1), ref.float())


def test_into_accepts_cpu_fp32_start_for_bf16_output():
    s, e = _pair()
    out = [e.bfloat16().clone()]
    interpolate_into_(out, [s], [e.bfloat16()], 0.25)
    ref = (0.75 * s + 0.25 * e.bfloat16().float()).bfloat16()
    torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-2)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_slerp_matches_mergekit(alpha):
    mk = pytest.importorskip("mergekit.merge_methods.slerp", reason="mergekit is the SLERP reference")
    s, e = _pair(3, (6, 9))
    ref = mk.slerp(torch.tensor(alpha), s.reshape(1, -1), e.reshape(1, -1)).reshape(s.shape)
    torch.testing.assert_close(slerp(s, e, alpha), ref, rtol=1e-5, atol=1e-6)


def test_slerp_walks_the_great_circle_of_unit_vectors():
    s, e = _pair(5, (50,))
    s, e = s / s.norm(), e / e.norm()
    omega = math.acos((s @ e).item())
    for alpha in (0.25, 0.5, 0.75):
        out = slerp(s, e, alpha)
        assert out.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert math.acos(min(1.0, (out @ s).item())) == pytest.approx(alpha * omega, abs=1e-4)
        assert math.acos(min(1.0, (out @ e).item())) == pytest.approx((1 - alpha) * omega, abs=1e-4)


def test_slerp_falls_back_to_linear_for_parallel_and_zero_tensors():
    s, _ = _pair()
    e = 2.0 * s  # parallel: Ω = 0
    torch.testing.assert_close(slerp(s, e, 0.3), 0.7 * s + 0.3 * e)
    z = torch.zeros_like(s)
    torch.testing.assert_close(slerp(z, s, 0.3), 0.3 * s)
    near = s + 1e-4 * torch.randn_like(s)
    torch.testing.assert_close(slerp(s, near, 0.5), 0.5 * s + 0.5 * near)


def test_mappings_and_mismatch_errors_name_the_tensor():
    s, e = _pair()
    out = interpolate({"w": s, "b": e[0]}, {"w": e, "b": s[0]}, 0.5)
    torch.testing.assert_close(out["w"], 0.5 * (s + e))
    with pytest.raises(ValueError, match="'w'"):
        interpolate({"w": s}, {"w": e[:3]}, 0.5)
    with pytest.raises(ValueError, match="only in end \\['x'\\]"):
        interpolate({"w": s}, {"w": e, "x": e}, 0.5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "abc"])
def test_alpha_outside_unit_interval_is_refused(alpha):
    s, e = _pair()
    with pytest.raises(ValueError, match="alpha"):
        interpolate([s], [e], alpha)


def test_extrapolation_is_an_explicit_opt_in():
    s, e = _pair()
    assert check_alpha(1.5, extrapolate=True) == 1.5
    out = interpolate([s], [e], 1.5, extrapolate=True)[0]
    torch.testing.assert_close(out, -0.5 * s + 1.5 * e)
    with pytest.raises(ValueError, match="method"):
        interpolate([s], [e], 0.5, method="cubic")


def test_in_place_from_end_matches_formula_and_endpoints():
    s, e = _pair(7)
    for alpha in (0.0, 0.3, 0.8, 1.0):
        live = [e.clone()]
        interpolate_end_(live, [s], alpha)
        torch.testing.assert_close(live[0], (1 - alpha) * s + alpha * e, rtol=0, atol=1e-6)
        if alpha in (0.0, 1.0):
            assert torch.equal(live[0], s if alpha == 0.0 else e)
    live = [e.bfloat16()]
    interpolate_end_(live, [s.bfloat16().float()], 0.0)
    assert torch.equal(live[0], s.bfloat16())
    live = [e.clone()]
    interpolate_end_(live, [s], 0.4, method="slerp")
    torch.testing.assert_close(live[0], slerp(s, e, 0.4))


# -- multi-model spherical merges ------------------------------------------------------------
def _dense_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook formula on flattened float64 tensors (no threshold): the independent reference."""
    fa, fb = a.double().reshape(-1), b.double().reshape(-1)
    om = math.acos((fa @ fb / (fa.norm() * fb.norm())).item())
    return ((math.sin((1 - t) * om) * fa + math.sin(t * om) * fb) / math.sin(om)).reshape(a.shape)


def _merge(method: str, base, tensors, **params):
    """One tensor through the registry (what the engine and recipes run), parameters at their defaults."""
    spec = METHODS[method]
    g = {k: p.default for k, p in spec.global_params.items()} | params
    m = [{k: p.default for k, p in spec.model_params.items()} for _ in tensors]
    for i, w in enumerate(params.pop("weights", []) or []):
        m[i]["weight"] = w
    g.pop("weights", None)
    base = None if base is None else base.clone()
    return spec.apply(base, [t.clone() for t in tensors], g, m)


def _family(n: int, shape=(6, 5), seed=7):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_warp_of_two_policies_is_slerp_of_their_task_vectors(weights):
    """WARP stage 2: θ_init + sin((1−λ)Ω)/sin Ω δ_1 + sin(λΩ)/sin Ω δ_2, λ = w_2/(w_1+w_2) (default 1/2)."""
    init, (p1, p2) = _family(2)
    lam = 0.5 if weights is None else 0.75
    ref = init + _dense_slerp(p1 - init, p2 - init, lam)
    got = _merge("warp", init, [p1, p2], weights=weights)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # the same merge from the registry's nuslerp (mergekit's two-model case)
    torch.testing.assert_close(_merge("nuslerp", init, [p1, p2], weights=weights), ref, rtol=0, atol=1e-12)


def test_iterated_slerp_of_three_orthogonal_vectors_by_hand():
    """μ_2 = slerp(e1, e2, 1/2) = (e1+e2)/√2; μ_3 = slerp(μ_2, e3, 1/3) = sin(π/3) μ_2 + sin(π/6) e3."""
    e = torch.eye(3, dtype=torch.float64)
    got = slerp_iterated([e[0], e[1], e[2]])
    ref = torch.tensor([math.sqrt(3 / 8), math.sqrt(3 / 8), 0.5], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    # a zero weight leaves a policy out; the first weight's share is w_1/Σw
    torch.testing.assert_close(
        slerp_iterated([e[0], e[1], e[2]], [1.0, 1.0, 0.0]), (e[0] + e[1]) / math.sqrt(2)
    )


@pytest.mark.parametrize("dim", [0, -1])
def test_slerp_per_vector_along_an_axis(dim):
    """slerp(dim=k): every vector along axis k on its own great circle (a loop of whole-tensor SLERPs)."""
    a, b = _pair(11, (5, 4))
    a, b = a.double(), b.double()
    b[:, 2] = 3.0 * a[:, 2]  # one column parallel: its own linear case
    got = slerp(a, b, 0.3, dim=dim)
    pairs = zip(a.unbind(1 if dim == 0 else 0), b.unbind(1 if dim == 0 else 0), strict=True)
    ref = torch.stack([slerp(x, y, 0.3) for x, y in pairs], dim=1 if dim == 0 else 0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_without_flattening_matches_mergekit_function(row_wise):
    mk = pytest.importorskip("mergekit.merge_methods.nuslerp", reason="mergekit is the nuslerp reference")
    init, (p1, p2) = _family(2, shape=(7, 6), seed=3)
    ref = init + mk.nuslerp(0.25, p1 - init, p2 - init, dim=0 if row_wise else -1)
    got = _merge(
        "nuslerp", init, [p1, p2], weights=[3.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise
    )
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_multislerp_by_hand_and_two_equal_norms_is_the_slerp_midpoint():
    """Orthogonal τ_1 = 2 e1, τ_2 = 4 e2, equal weights: direction (e1+e2)/√2, norm the mean norm 3."""
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(multislerp([2 * e[0], 4 * e[1]]), 3 * (e[0] + e[1]) / math.sqrt(2))
    a, b = _pair(2, (30,))
    a, b = a.double(), b.double()
    a, b = a / a.norm(), 1.7 * b / b.norm()
    torch.testing.assert_close(multislerp([1.7 * a, b]), _dense_slerp(1.7 * a, b, 0.5), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="zero"):
        multislerp([e[0], -e[0], e[1] * 0])


def test_karcher_of_two_points_is_their_slerp_midpoint_and_of_symmetric_points_their_centre():
    a, b = _pair(4, (40,))
    a, b = a.double(), b.double()
    a, b = 2.0 * a / a.norm(), 2.0 * b / b.norm()  # equal norms: one sphere
    torch.testing.assert_close(karcher_mean([a, b]), _dense_slerp(a, b, 0.5), rtol=0, atol=1e-9)
    e = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(
        karcher_mean([e[0], e[1], e[2]]), torch.ones(3, dtype=torch.float64) / math.sqrt(3)
    )


def test_karcher_unequal_weights_is_the_stationary_point():
    """The weighted Karcher mean μ makes Σ w_i log_μ(u_i) (the Riemannian gradient) vanish."""
    g = torch.Generator().manual_seed(9)
    pts = [torch.randn(8, generator=g, dtype=torch.float64) + 2.0 for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    mu = karcher_mean(pts, w, max_iter=100, tol=1e-12)
    mu = mu / mu.norm()
    grad = torch.zeros(8, dtype=torch.float64)
    for wi, p in zip(w, pts, strict=True):
        u = p / p.norm()
        c = float(u @ mu)
        om = math.acos(min(1.0, c))
        grad += wi * om / math.sin(om) * (u - c * mu)
    assert grad.norm().item() < 1e-10


def test_karcher_matches_mergekit_function():
    mk = pytest.importorskip("mergekit.merge_methods.karcher", reason="mergekit is the karcher reference")
    _, models = _family(4, seed=8)
    ref = mk.karcher_merge_tensors([t.clone() for t in models], [0.25] * 4, max_iter=10, tol=1e-5)
    torch.testing.assert_close(_merge("karcher", None, models), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["warp"])
def test_lambda_is_liti_toward_the_init(method):
    """LITI (WARP stage 3): (1−η) θ_init + η θ_merged is the spherical merge with lambda = η (warp: mergekit's
    nuslerp, multislerp and karcher take no lambda)."""
    init, models = _family(2, seed=12)
    merged = _merge(method, init, models)
    eta = 0.3
    torch.testing.assert_close(
        _merge(method, init, models, **{"lambda": eta}), (1 - eta) * init + eta * merged, rtol=0, atol=1e-12
    )
