import math

import pytest
import torch

from robustft.ops.interpolate import (
    check_alpha,
    interpolate,
    interpolate_end_,
    interpolate_into_,
    lerp,
    slerp,
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
