"""DaWin on two models in memory: per-component evaluation against brute force, K=1 against static WiSE-FT,
and the live weights restored after the evaluation (also when it raises)."""

import copy

import pytest
import torch
from torch import nn

from robustft.interpolation.wise_ft import WiseFTWeights, evaluate_at_alphas, interpolate_models
from robustft.ops.dawin import component_alphas, dawin_lambda, fit_beta_mixture, prediction_entropy


def _pair(seed=0):
    torch.manual_seed(seed)
    start = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    end = copy.deepcopy(start)
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return start, end


def _inputs(n=40, seed=1):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)) * 2


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _dawin_plan(start, end, x, k):
    lam = dawin_lambda(prediction_entropy(start(x)), prediction_entropy(end(x)))
    return lam, *component_alphas(lam, fit_beta_mixture(lam, k).assign(lam))


@torch.no_grad()
def test_per_component_evaluation_equals_one_interpolated_model_per_input():
    start, end = _pair()
    x = _inputs()
    lam, alphas, groups = _dawin_plan(start, end, x, 3)
    assert len(alphas) >= 2  # several components, each with its own α
    start_state, end_state = _state(start), _state(end)
    weights = WiseFTWeights.from_models(start, end)
    parts = evaluate_at_alphas(weights, alphas, lambda i: end(x[groups[i]]))
    got = torch.empty(len(x), 4)
    for g, out in zip(groups, parts, strict=True):
        got[g] = out
    alpha_of = {int(j): a for a, g in zip(alphas, groups, strict=True) for j in g}
    for j in range(len(x)):  # brute force: a deep copy of the model at θ(α(x_j)) for every input
        model = copy.deepcopy(end)
        interpolate_models(start, end, alpha_of[j], into=model)
        torch.testing.assert_close(got[j], model(x[j : j + 1])[0], rtol=0, atol=1e-6)
    for k, v in end.state_dict().items():  # restored bit-exactly; the start untouched
        assert torch.equal(v, end_state[k]), k
        assert torch.equal(start.state_dict()[k], start_state[k]), k


@torch.no_grad()
def test_one_component_is_static_wise_ft_at_the_mean_lambda_bit_for_bit():
    start, end = _pair(2)
    x = _inputs(seed=3)
    lam, alphas, groups = _dawin_plan(start, end, x, 1)
    assert alphas == [float(lam.double().mean())] and len(groups[0]) == len(x)
    weights = WiseFTWeights.from_models(start, end)
    (got,) = evaluate_at_alphas(weights, alphas, lambda i: end(x[groups[i]]))
    static = copy.deepcopy(end)
    interpolate_models(start, end, alphas[0], into=static)
    assert torch.equal(got, static(x))


def test_weights_restored_when_the_evaluation_raises():
    start, end = _pair()
    end_state = _state(end)
    weights = WiseFTWeights.from_models(start, end)
    seen = []

    def run(i):
        seen.append(_state(end))
        if i == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        evaluate_at_alphas(weights, [0.25, 0.75, 1.0], run)
    assert len(seen) == 2
    assert not torch.equal(seen[1]["0.weight"], end_state["0.weight"])  # it did interpolate
    for k, v in end.state_dict().items():
        assert torch.equal(v, end_state[k]), k


def test_from_models_refuses_models_that_do_not_match():
    start, end = _pair()
    with pytest.raises(ValueError, match="only in end"):
        WiseFTWeights.from_models(start[:2], end)
    other = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match="'3.weight'.*shape"):
        WiseFTWeights.from_models(start, other)
    with pytest.raises(ValueError, match="alphas"):
        evaluate_at_alphas(WiseFTWeights.from_models(start, end), [1.5], lambda i: None)
