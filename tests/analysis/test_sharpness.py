"""RiFT's module criticality and the layer-wise sharpness along the WiSE-FT path
(robustft.analysis.sharpness),
against one-step ascents computed by hand, brute force over random directions and direct measurements."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from robustft.analysis.sharpness import (
    SharpnessReport,
    default_modules,
    layer_sharpness,
    least_critical_module,
    module_criticality,
    plot_sharpness,
    sharpness_along_path,
    straggler_layers,
    treat_stragglers,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2))


def _data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] > 0).long()


def _ce(outputs, batch):
    return nn.functional.cross_entropy(outputs, batch[1])


def _bits(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_bit_identical(model, before):
    after = model.state_dict()
    for n, t in before.items():
        assert torch.equal(after[n].view(torch.int32), t.view(torch.int32)), n


def test_mrc_with_one_step_is_the_hand_computed_ascent():
    """steps=1: ΔW = ε‖W‖·g/‖g‖ on the module (weight and bias together), MRC = max(0, L(θ+ΔW) − L(θ))."""
    model, batch, eps = _mlp(), _data(), 0.2
    mrc = module_criticality(model, batch, epsilon=eps, steps=1, loss_fn=_ce)
    assert list(mrc) == ["0", "3"]
    for name in mrc:
        ref = copy.deepcopy(model).eval()
        params = list(dict(ref.named_modules())[name].parameters())
        loss = _ce(ref(batch[0]), batch)
        grads = torch.autograd.grad(loss, params)
        w_norm = torch.cat([p.detach().reshape(-1) for p in params]).norm()
        g_norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g * (eps * w_norm / g_norm))
            expected = max(0.0, float(_ce(ref(batch[0]), batch)) - float(loss))
        assert expected > 0
        assert mrc[name] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_the_ascent_finds_at_least_what_random_directions_find():
    """Brute force on a 2-parameter module: no point of 2000 random ones in the ball beats the ascent."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False)
    x = torch.randn(12, 2)
    batch = (x, x @ torch.tensor([1.5, -0.7]) + 0.3)

    def mse(outputs, b):
        return (outputs.squeeze(1) - b[1]).pow(2).mean()

    eps = 0.5
    found = module_criticality(model, batch, modules=[""], epsilon=eps, steps=30, loss_fn=mse)[""]
    w = model.weight.detach()
    base = float(mse(model(x), batch).detach())
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(2000, 1, 2, generator=g)
    radii = eps * w.norm() * torch.rand(2000, 1, 1, generator=g).sqrt()
    points = w + dirs / dirs.norm(dim=(1, 2), keepdim=True) * radii
    with torch.no_grad():
        best = max(float(mse(nn.functional.linear(x, p), batch)) - base for p in points)
    assert best > 0
    assert found >= best - 1e-6


def test_least_critical_module_is_the_argmin():
    model, batch = _mlp(), _data()
    mrc = module_criticality(model, batch, steps=2, loss_fn=_ce)
    assert least_critical_module(model, batch, steps=2, loss_fn=_ce) == min(mrc, key=mrc.get)


class _Boom(RuntimeError):
    pass


def _raise_on_call(model, n):
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Boom("forward failed")

    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("fail_at", [None, 3])
def test_the_model_is_left_bit_identical_with_its_modes_and_no_grad(fail_at):
    model, batch = _mlp(), _data()
    model.train()
    model[2].eval()  # mixed modes come back as they were
    before = _bits(model)
    handle = _raise_on_call(model, fail_at) if fail_at else None
    if fail_at:
        with pytest.raises(_Boom):
            module_criticality(model, batch, steps=3, loss_fn=_ce)
        handle.remove()
    else:
        module_criticality(model, batch, steps=3, loss_fn=_ce)
    _assert_bit_identical(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model[0].training and not model[2].training


@pytest.mark.parametrize("ball", ["adaptive_linf", "relative_l2"])
@pytest.mark.parametrize("start_kind", ["model", "state_dict"])
def test_sharpness_at_the_path_ends_is_that_of_the_start_and_finetuned_models(ball, start_kind):
    start, finetuned, batch = _mlp(0), _mlp(1), _data()
    kw = dict(rho=0.05, ball=ball, steps=3, loss_fn=_ce)
    at_start = layer_sharpness(start, batch, **kw)
    at_end = layer_sharpness(finetuned, batch, **kw)
    before = _bits(finetuned)
    origin = start if start_kind == "model" else start.state_dict()
    report = sharpness_along_path(origin, finetuned, batch, alphas=[1.0, 0.0, 0.5], **kw)
    assert report.alphas == [0.0, 0.5, 1.0] and report.layers == ["0", "3"]
    for layer in report.layers:
        assert report.sharpness[layer][0] == pytest.approx(at_start[layer], rel=1e-6, abs=1e-9)
        assert report.sharpness[layer][2] == pytest.approx(at_end[layer], rel=1e-6, abs=1e-9)
    assert report.loss[0] == pytest.approx(float(_ce(start.eval()(batch[0]), batch).detach()), rel=1e-6)
    assert any(v > 0 for v in report.sharpness["3"])
    _assert_bit_identical(finetuned, before)


def test_the_finetuned_weights_come_back_when_the_model_raises_on_the_path():
    start, finetuned, batch = _mlp(0), _mlp(1), _data()
    before = _bits(finetuned)
    handle = _raise_on_call(finetuned, 7)  # inside the second α's measurement
    with pytest.raises(_Boom):
        sharpness_along_path(start, finetuned, batch, alphas=[0.0, 0.5, 1.0], steps=2, loss_fn=_ce)
    handle.remove()
    _assert_bit_identical(finetuned, before)


def test_layers_name_any_module_and_the_default_is_every_weighted_module():
    model, batch = _mlp(), _data()
    assert default_modules(model) == ["0", "3"]
    whole = layer_sharpness(model, [batch, _data(1)], layers=["", "3"], steps=2, loss_fn=_ce)
    assert set(whole) == {"", "3"} and whole[""] >= 0


def test_report_files_hold_the_table(tmp_path):
    start, finetuned, batch = _mlp(0), _mlp(1), _data()
    report = sharpness_along_path(start, finetuned, batch, alphas=[0.0, 1.0], steps=1, loss_fn=_ce)
    paths = report.save(tmp_path)
    names = sorted(p.name for p in paths)
    assert names[:2] == ["sharpness.csv", "sharpness.json"]
    data = json.loads((tmp_path / "sharpness.json").read_text())
    assert data["sharpness"] == report.sharpness and data["loss"] == report.loss
    rows = (tmp_path / "sharpness.csv").read_text().splitlines()
    assert rows[0] == "layer,0,1" and rows[1].startswith("loss,") and rows[2].startswith("0,")
    assert float(rows[3].split(",")[2]) == report.sharpness["3"][1]
    assert len(report.sharpest()) == 2 and "loss" in report.table()
    pytest.importorskip("matplotlib")
    assert "sharpness.png" in names
    assert plot_sharpness(report, tmp_path / "again.png").stat().st_size > 1000


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, b: module_criticality(m, b, epsilon=-1), "epsilon must be >= 0.0, got -1"),
    (lambda m, b: module_criticality(m, b, steps=0), "steps: expected a positive integer"),
    (lambda m, b: module_criticality(m, b, step_size=0.0), "step_size: expected a finite number > 0"),
    (lambda m, b: module_criticality(m, b, modules=["fc"]), "modules: 'fc' is not a module of the model"),
    (lambda m, b: module_criticality(m, b, modules=["1"]), "modules: module '1' has no floating parameter"),
    (lambda m, b: module_criticality(m, [], loss_fn=_ce), "data: no batch"),
    (lambda m, b: module_criticality(m, b), "the model returned no loss"),
    (lambda m, b: layer_sharpness(m, b, ball="l1"), "ball: 'l1' is not one of"),
    (lambda m, b: sharpness_along_path(m, m, b, alphas=[2.0]), "alphas"),
    (lambda m, b: sharpness_along_path(3, m, b, loss_fn=_ce), "start: expected a model or a state dict"),
    (lambda m, b: sharpness_along_path({"0.weight": torch.zeros(5, 3)}, m, b, loss_fn=_ce),
     "tensor '0.bias' missing in start"),
])
def test_bad_options_are_named_errors_and_change_nothing(call, message):
    model, batch = _mlp(), _data()
    before = _bits(model)
    with pytest.raises(ValueError, match=message):
        call(model, batch)
    _assert_bit_identical(model, before)


def test_a_non_finite_loss_is_refused():
    model, batch = _mlp(), _data()
    with pytest.raises(FloatingPointError, match="not finite"):
        module_criticality(model, batch, loss_fn=lambda o, b: o.sum() * math.inf)


def _rift_recipe(tmp_path):
    """RiFT end to end as docs/regularizers.md shows it: measure, train the least critical module, WiSE-FT."""
    from transformers import Trainer

    from robustft import WiseFTCallback
    from tests.tiny import tiny_bert, token_dataset, training_args

    model = tiny_bert(0)
    train, val = token_dataset(48, seed=0), token_dataset(32, seed=1)
    batch = {k: torch.tensor(val[k]) for k in ("input_ids", "labels")}
    name = least_critical_module(model, batch, steps=2)
    start = _bits(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(f"{name}."))
    wise = WiseFTCallback(eval_datasets={"id": val}, id_dataset="id", metric="loss", greater_is_better=False,
                          alphas=[0.0, 0.5, 1.0])
    Trainer(model=model, args=training_args(tmp_path), train_dataset=train, callbacks=[wise]).train()
    return model, name, start, wise


@pytest.mark.slow
def test_rift_recipe_trains_only_the_least_critical_module_and_interpolates(tmp_path):
    model, name, start, wise = _rift_recipe(tmp_path)
    after = model.state_dict()
    moved = {n for n, t in start.items() if not torch.equal(after[n], t)}
    assert all(n.startswith(f"{name}.") for n in moved), moved
    curve = json.loads((tmp_path / "wise_ft.json").read_text())
    assert curve["alphas"] == [0.0, 0.5, 1.0]
    assert bool(moved) == (curve["chosen_alpha"] > 0)


def test_a_module_the_forward_never_uses_is_zero_and_never_the_least_critical():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = _mlp(), nn.Linear(3, 3)

        def forward(self, x):
            return self.net(x)

    model, batch = WithUnused(), _data()
    mrc = module_criticality(model, batch, steps=2, loss_fn=_ce)
    assert list(mrc) == ["net.0", "net.3", "unused"]
    assert mrc["unused"] == 0.0 and mrc["net.0"] > 0 and mrc["net.3"] > 0
    assert least_critical_module(model, batch, steps=2, loss_fn=_ce) == min(["net.0", "net.3"], key=mrc.get)
    with pytest.raises(ValueError, match="the loss depends on none of"):
        least_critical_module(model, batch, modules=["unused"], loss_fn=_ce)


def _report():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    sharp = {"a": [0.1, 0.9, 0.8, 0.7, 0.1],   # turns sharp inside the path
             "b": [2.0, 1.6, 1.3, 1.1, 1.0],   # sharpest, but only at the start
             "c": [0.5, 0.5, 0.6, 0.4, 0.3]}
    return SharpnessReport(alphas, list(sharp), sharp, [0.0] * 5)


def test_straggler_layers_rank_by_sharpness_or_by_its_excess_over_the_chord():
    report = _report()
    assert straggler_layers(report, 1) == ["b"]
    assert straggler_layers(report, 3) == ["b", "a", "c"]
    # brute force of the excess: max over inner α of S(α) − ((1−α)S(0) + αS(1))
    excess = {}
    for layer, v in report.sharpness.items():
        excess[layer] = max(v[i] - ((1 - a) * v[0] + a * v[-1]) for i, a in enumerate(report.alphas)
                            if 0 < a < 1)
    want = sorted((k for k in excess if excess[k] > 0), key=lambda k: -excess[k])
    assert straggler_layers(report, 3, "excess") == want == ["a", "c"]  # b is below its chord
    with pytest.raises(ValueError, match="rule must be one of"):
        straggler_layers(report, 1, "loudest")
    with pytest.raises(ValueError, match="k"):
        straggler_layers(report, 0)


def test_treat_stragglers_sparsifies_the_named_modules_task_vectors_only():
    start, model = _mlp(0), _mlp(1)
    s, e = treat_stragglers(start, model, ["0"], "sparsify", density=0.2)
    tau = model.state_dict()["0.weight"] - start.state_dict()["0.weight"]
    kept = (e["0.weight"] - start.state_dict()["0.weight"]) != 0
    assert int(kept.sum()) == int(0.2 * tau.numel())  # ⌊0.2·15⌋ = 3 largest |τ| kept
    assert tau.abs()[kept].min() >= tau.abs()[~kept].max()
    assert torch.equal(e["3.weight"], model.state_dict()["3.weight"])  # other layers untouched
    assert torch.equal(s["0.weight"], start.state_dict()["0.weight"])
    with pytest.raises(ValueError, match="'9' is not a module"):
        treat_stragglers(start, model, ["9"])
