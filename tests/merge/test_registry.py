"""The merge-method registry (robustft/merge/registry.py): each method's tensor function gets one typed
MergeInputs, and per-model statistics reach it under their own name (RegMean's Grams are not "fishers")."""

import pytest
import torch

from robustft.merge.registry import METHODS, MergeInputs, method_spec, tensor_seed
from robustft.ops import merge as M


def _params(name: str, n: int, **given):
    spec = METHODS[name]
    g = {k: p.default for k, p in spec.global_params.items()}
    m = [{k: p.default for k, p in spec.model_params.items()} | given for _ in range(n)]
    return spec, g, m


def test_regmean_gets_grams_and_fisher_gets_fishers():
    """The statistics named by the spec arrive as MergeInputs.grams / .fishers, never in the other slot."""
    assert METHODS["regmean"].statistics == "gram" and METHODS["fisher"].statistics == "fisher"
    g0 = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=g0) for _ in range(2)]
    xs = [torch.randn(6, 4, generator=g0) for _ in range(2)]
    grams = [x.T @ x / 6 for x in xs]
    spec, g, m = _params("regmean", 2, gram="unused", weight=1.0)
    got = spec.apply(None, [w.clone() for w in ws], g, m, 0, iter(grams))
    # reference: RegMean's closed form, (Σ W_i G_i)(Σ G_i)^-1 for (out, in) weights
    total = sum(gr.double() for gr in grams)
    want = sum(w.double() @ gr.double() for w, gr in zip(ws, grams)) @ torch.linalg.inv(total)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    fishers = [torch.rand(3, 4, generator=g0) + 0.1 for _ in range(2)]
    spec, g, m = _params("fisher", 2, fisher="unused", weight=1.0)
    got = spec.apply(None, [w.clone() for w in ws], g, m, 0, fishers)
    torch.testing.assert_close(got, M.fisher_merge(ws, fishers, eps=g["eps"], weights=[1.0, 1.0]))


def test_a_method_without_statistics_gets_none():
    seen = []
    spec = METHODS["linear"]
    fn = spec.fn

    def probe(x: MergeInputs) -> torch.Tensor:
        seen.append((x.fishers, x.grams, x.weights))
        return fn(x)

    object.__setattr__(spec, "fn", probe)
    try:
        _, g, m = _params("linear", 2, weight=1.0)
        spec.apply(None, [torch.ones(2), torch.zeros(2)], g, m, 0, [torch.ones(2)])
    finally:
        object.__setattr__(spec, "fn", fn)
    assert seen == [(None, None, [1.0, 1.0])]


def test_tensor_seed_is_stable_and_per_name():
    assert tensor_seed(0, "a") == tensor_seed(0, "a") != tensor_seed(0, "b")
    assert 0 <= tensor_seed(7, "x") < 2**63


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="merge_method"):
        method_spec("merge_method", "no_such_method")
