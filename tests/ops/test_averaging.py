"""ops/averaging.py against torch.optim.swa_utils and the formulas written out densely."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from robustft.ops.averaging import ema_decay, ema_update_, mean_of, squared_distance, swa_update_


def _trajectory(steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=g), torch.randn(5, generator=g)] for _ in range(steps)]


def _module(tensors):
    m = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in tensors])
    return m


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_matches_averaged_model(foreach):
    traj = _trajectory()
    live = _module(traj[0])
    ref = AveragedModel(live, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    avg = [t.clone() for t in traj[0]]
    for k, point in enumerate(traj):
        with torch.no_grad():
            for p, t in zip(live, point):
                p.copy_(t)
        ref.update_parameters(live)
        if k == 0:
            swa_update_(avg, point, 0)
        else:
            ema_update_(avg, point, 0.9, foreach=foreach)
    for a, r in zip(avg, ref.module.parameters()):
        torch.testing.assert_close(a, r.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("foreach", [True, False])
def test_swa_matches_averaged_model_and_mean(foreach):
    traj = _trajectory()
    live = _module(traj[0])
    ref = AveragedModel(live)
    avg = [torch.zeros_like(t) for t in traj[0]]
    for n, point in enumerate(traj):
        with torch.no_grad():
            for p, t in zip(live, point):
                p.copy_(t)
        ref.update_parameters(live)
        swa_update_(avg, point, n, foreach=foreach)
    for i, (a, r) in enumerate(zip(avg, ref.module.parameters())):
        torch.testing.assert_close(a, r.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(a, torch.stack([p[i] for p in traj]).mean(0), atol=1e-6, rtol=0)


def test_fp32_shadow_of_bf16_weights():
    live = [torch.randn(8, 8).bfloat16()]
    avg = [live[0].float()]
    new = [torch.randn(8, 8).bfloat16()]
    ema_update_(avg, new, 0.99)
    expected = 0.99 * live[0].float() + 0.01 * new[0].float()
    assert avg[0].dtype == torch.float32
    torch.testing.assert_close(avg[0], expected, atol=1e-6, rtol=1e-6)


def test_ema_decay_warmup_formula():
    assert ema_decay(10, 0.999) == 0.999
    for k in [0, 1, 5, 100, 10_000]:
        expected = min(0.999, 1 - (1 + k / 2.0) ** (-0.75))
        got = ema_decay(k, 0.999, warmup=True, warmup_gamma=2.0, warmup_power=0.75)
        assert got == pytest.approx(expected)
    assert ema_decay(0, 0.999, warmup=True) == 0.0  # first update copies, as AveragedModel's


def test_mean_of_and_distance():
    traj = _trajectory(steps=3)
    out = [torch.empty_like(t) for t in traj[0]]
    mean_of(out, traj)
    for i in range(2):
        torch.testing.assert_close(out[i], sum(p[i] for p in traj) / 3)
    expected = sum(((a - b) ** 2).sum() for a, b in zip(traj[0], traj[1]))
    assert float(squared_distance(traj[0], traj[1])) == pytest.approx(float(expected), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="averaged tensors"):
        ema_update_([torch.zeros(2)], [], 0.9)
    with pytest.raises(ValueError, match="n_averaged"):
        swa_update_([torch.zeros(2)], [torch.zeros(2)], -1)
    with pytest.raises(ValueError, match="at least one"):
        mean_of([torch.zeros(2)], [])


def test_ema_decay_warmup_defaults_are_timms():
    """docs/averaging.md: γ = 1 and p = 2/3 by default, as timm's ModelEmaV3 (warmup_gamma=1.0,
    warmup_power=2/3), whose decay after k updates is 1 − (1 + k/γ)^−p capped at the target decay."""
    for k in [1, 3, 10, 1000]:
        assert ema_decay(k, 0.999, warmup=True) == pytest.approx(min(0.999, 1 - (1 + k) ** (-2 / 3)))


@pytest.mark.parametrize("foreach", [True, False])
def test_bema_update_is_the_dense_formula(foreach):
    from robustft.ops.averaging import bema_coefficients, bema_update_

    traj = _trajectory(steps=5)
    theta0 = [t.clone() for t in traj[0]]
    ema, out = [t.clone() for t in traj[0]], [torch.zeros_like(t) for t in traj[0]]
    ref_ema = [t.double() for t in traj[0]]
    for step, point in enumerate(traj[1:], start=1):
        beta, alpha = bema_coefficients(step * 3, ema_power=0.5, bias_power=0.2, lag=10, multiplier=2.0)
        assert (beta, alpha) == pytest.approx(((10 + 6 * step) ** -0.5, (10 + 6 * step) ** -0.2))
        bema_update_(out, ema, theta0, point, beta, alpha, foreach=foreach)
        ref_ema = [(1 - beta) * e + beta * p.double() for e, p in zip(ref_ema, point)]
        ref_out = [e + alpha * (p.double() - t0.double()) for e, p, t0 in zip(ref_ema, point, theta0)]
        for o, r in zip(out, ref_out):
            torch.testing.assert_close(o.double(), r, atol=1e-6, rtol=0)
    assert bema_coefficients(10**6, min_ema_multiplier=0.3)[0] == 0.3  # the floor on β


def test_half_life_decay_halves_a_term_every_half_life():
    from robustft.ops.averaging import half_life_decay

    assert half_life_decay(1, 10) ** 10 == pytest.approx(0.5)
    assert half_life_decay(64, 1000) == pytest.approx(0.5 ** 0.064)
    assert half_life_decay(0, 5) == 1.0
    with pytest.raises(ValueError, match="half_life"):
        half_life_decay(1, 0)


@pytest.mark.parametrize("strategy, anneal", [("cos", 4), ("linear", 3), ("cos", 0), ("linear", 1)])
def test_swalr_lr_equals_torch_swalr(strategy, anneal):
    from torch.optim.swa_utils import SWALR

    from robustft.ops.averaging import swalr_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.2)
    sched = SWALR(opt, swa_lr=0.01, anneal_epochs=anneal, anneal_strategy=strategy)
    for k in range(1, 8):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(swalr_lr(0.2, 0.01, k, anneal, strategy), abs=1e-12)
    with pytest.raises(ValueError, match="anneal_strategy"):
        swalr_lr(0.2, 0.01, 1, 2, "step")
