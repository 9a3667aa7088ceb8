"""TSV-M, Iso-C, Iso-CTS, RegMean and layer-wise AdaMerging against FusionBench's own functions on the same
tensors.

fusion-bench is not installable next to robustft's test environment without pulling hydra-core, lightning,
tensorboard, h5py and more, so this test loads the files that hold the maths
(``method/task_singular_vector/utils/TSVM_utils.py``, ``method/isotropic_merging/iso_utils.py``,
``method/regmean/regmean.py``) from an unpacked wheel, with the package's ``__init__`` stubbed. Run it with::

    pip download --no-deps fusion-bench -d /tmp/fb && unzip -q /tmp/fb/fusion_bench-*.whl -d /tmp/fb/whl
    FUSION_BENCH_DIR=/tmp/fb/whl/fusion_bench python -m pytest -q tests/merge/test_fusionbench.py

Measured with fusion-bench 0.2.33 (float64): largest relative difference 2.2e-15 (tsv_m, iso_c) and 4.5e-14
(iso_cts); FusionBench's iso_cts raises where its rounding of the task-specific size overshoots the rank
(r = 9, T = 5, common_space_fraction = 0.2), robustft caps it (``iso_cts_sizes``). RegMean
(``merging_with_regmean_weights``): 6.1e-16 with the ratio rounded to float32 as FusionBench's scaling
matrix does (1.2e-8 without).

The loader ``_load`` is also used by ``tests/interpolation/test_wemoe.py`` (FusionBench's
``models/we_moe.py``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from robustft.ops import merge as M
from tests.merge.fusionbench import ROOT, load_module

_load = load_module
pytestmark = pytest.mark.skipif(not ROOT, reason="FUSION_BENCH_DIR (an unpacked fusion-bench wheel) not set")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(16, 12), (12, 16), (24, 24), (40, 10), (7,), (5, 3, 2)])
def test_svd_merges_equal_fusionbench(n, shape):
    tsv = _load("fb_tsvm_utils", "method/task_singular_vector/utils/TSVM_utils.py")
    iso = _load("fb_iso_utils", "method/isotropic_merging/iso_utils.py")
    g = torch.Generator().manual_seed(n)
    deltas = [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) for i in range(n)]
    sds = [{"w": d.clone()} for d in deltas]
    with contextlib.redirect_stdout(None):
        pairs = [
            (M.tsv_merge(deltas), tsv.compute_and_sum_svd_mem_reduction(sds, accelerator="cpu")["w"]),
            (M.iso_c(deltas), iso.iso_c(sds, accelerator="cpu")["w"]),
            *[(M.iso_cts(deltas, f), iso.iso_cts(sds, f, accelerator="cpu")["w"]) for f in (0.8, 0.5, 0.2)],
        ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _load_regmean():
    package = "fusion_bench.method.regmean"
    return _load(
        f"{package}.regmean",
        "method/regmean/regmean.py",
        {
            "fusion_bench.method": {"__path__": [], "BaseAlgorithm": type("BaseAlgorithm", (), {})},
            package: {"__path__": [str(Path(ROOT) / "method" / "regmean")]},
            "fusion_bench.mixins": {
                "SimpleProfilerMixin": type("SimpleProfilerMixin", (), {}),
                "auto_register_config": lambda cls: cls,
            },
            "fusion_bench.modelpool": {"BaseModelPool": object},
        },
    )


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("ratio", [1.0, 0.95, 0.6, 0.0])
def test_regmean_equals_fusionbench(n, ratio):
    """FusionBench's ``merging_with_regmean_weights`` on the same weights and (count-normalised) Grams, keyed
    by module name as it wants them: linear weights by RegMean (also with weight_transpose=False, GPT-2's
    Conv1D layout), every other tensor by the mean. FusionBench scales the off-diagonal entries by a float32
    matrix, i.e. by the ratio rounded to float32 (a 1e-8 relative difference for 0.95 or 0.6): robustft
    gets that rounded ratio here."""
    fb = _load_regmean()
    ratio32 = float(torch.tensor(ratio, dtype=torch.float32))
    g = torch.Generator().manual_seed(n)
    linear = [torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(n)]
    conv = [torch.randn(9, 4, generator=g, dtype=torch.float64) for _ in range(n)]  # (in, out)
    bias = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(n)]
    xs = [torch.randn(20 + 5 * k, 9, generator=g, dtype=torch.float64) for k in range(n)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    ours = {
        "l.weight": M.regmean(linear, grams, ratio32),
        "l.bias": torch.stack(bias).mean(0),
        "c.weight": M.regmean([w.T for w in conv], grams, ratio32).T,
    }
    params = {"l.weight": [w.clone() for w in linear], "l.bias": [b.clone() for b in bias]}
    theirs = fb.merging_with_regmean_weights(params, [{"l": gr.clone()} for gr in grams], ratio)
    conv_params = {"c.weight": [w.clone() for w in conv]}
    conv_grams = [{"c": gr.clone()} for gr in grams]
    theirs.update(fb.merging_with_regmean_weights(conv_params, conv_grams, ratio, weight_transpose=False))
    assert set(theirs) == set(ours)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-10, atol=1e-12, msg=name)


def test_layer_wise_adamerging_weights_and_entropy_equal_fusionbench():
    """Layer-wise AdaMerging's two pieces against FusionBench's own: the merged weights of
    ``LayerWiseMergedModel.merge_weights`` (one coefficient per task and parameter tensor) equal
    ``robustft.ops.learned.compose_weights`` with ``blocks="tensor"``, and FusionBench's ``entropy_loss``
    (eps = 1e-8 inside the log) equals the batch mean of ``robustft.ops.dawin.prediction_entropy``."""
    from robustft.ops.dawin import prediction_entropy
    from robustft.ops.learned import assign_blocks, compose_weights, task_vectors

    fusion = _load("fb_layer_wise_fusion", "models/wrappers/layer_wise_fusion.py",
                   needs=(("fusion_bench.models.utils", "models/utils.py"),))
    entropy = _load("fb_entropy_loss", "method/adamerging/entropy_loss.py")

    def mlp(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()

    start, ends = mlp(0), [mlp(1), mlp(2)]
    names = [n for n, _ in start.named_parameters()]
    coefficients = torch.rand(2, len(names), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sd = {n: p.detach().clone() for n, p in start.named_parameters()}
    taus = task_vectors(sd, [{n: p.detach() for n, p in e.named_parameters()} for e in ends])
    _, block_index = assign_blocks(names, "tensor")
    ours = compose_weights(sd, taus, coefficients, block_index)
    theirs = fusion.LayerWiseMergedModel(coefficients.clone(), mlp(0), [mlp(1), mlp(2)]).merge_weights()
    for n in names:
        torch.testing.assert_close(ours[n], theirs[n].detach(), rtol=0, atol=1e-15)

    logits = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    expected = entropy.entropy_loss(logits)
    torch.testing.assert_close(prediction_entropy(logits).mean(), expected, rtol=0, atol=1e-6)


def test_layer_wise_adamerging_clamps_coefficients_to_the_unit_interval_where_used():
    """docs/dynamic_interpolation.md: ``clamp=(0, 1)`` keeps the coefficients in [0, 1] "as AdaMerging does".
    FusionBench's ``LayerWiseMergedModel`` (``clamp_weights=True``, its default) merges with the coefficients
    clamped to [0, 1] (the stored ones stay free): its weights are ``compose_weights`` of the clamped
    coefficients, not of the raw ones."""
    from robustft.ops.learned import assign_blocks, compose_weights, task_vectors

    fusion = _load("fb_layer_wise_fusion", "models/wrappers/layer_wise_fusion.py",
                   needs=(("fusion_bench.models.utils", "models/utils.py"),))

    def mlp(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()

    start, ends = mlp(0), [mlp(1), mlp(2)]
    names = [n for n, _ in start.named_parameters()]
    raw = torch.tensor([[-0.5, 0.3, 1.7, 0.9], [1.2, -2.0, 0.4, 1.0]], dtype=torch.float64)
    sd = {n: p.detach().clone() for n, p in start.named_parameters()}
    taus = task_vectors(sd, [{n: p.detach() for n, p in e.named_parameters()} for e in ends])
    _, block_index = assign_blocks(names, "tensor")
    theirs = fusion.LayerWiseMergedModel(raw.clone(), mlp(0), [mlp(1), mlp(2)]).merge_weights()
    clamped = compose_weights(sd, taus, raw.clamp(0, 1), block_index)
    unclamped = compose_weights(sd, taus, raw, block_index)
    for n in names:
        torch.testing.assert_close(clamped[n], theirs[n].detach(), rtol=0, atol=1e-15)
    assert any(not torch.allclose(unclamped[n], theirs[n].detach()) for n in names)
