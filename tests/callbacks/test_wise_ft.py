import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from robustft import WiseFTCallback
from robustft.interpolation.wise_ft import interpolate_models
from tests.tiny import tiny_bert

VOCAB = 64


def _model(num_labels=1, seed=0):
    model = tiny_bert(seed, num_labels, hidden=32, vocab=VOCAB, dropout=0.0)
    if num_labels == 1:
        model.config.problem_type = "regression"
    return model.eval()


def _data(n, seed, labels=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    y = torch.randn(n, generator=g) if labels is None else labels
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": y.tolist()})


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=6,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=3,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, model, callbacks=(), eval_dataset=None, compute_metrics=None, **kw) -> Trainer:
    """A Trainer of ``model`` on the 48 training rows (``kw``: training arguments)."""
    return Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_data(48, 1),
                   callbacks=list(callbacks), eval_dataset=eval_dataset, compute_metrics=compute_metrics)


def _train(tmp_path, model, callbacks=(), **kw):
    trainer = _trainer(tmp_path, model, callbacks, **kw)
    trainer.train()
    return trainer


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(start state, fine-tuned state) of the reference run without WiSE-FT."""
    model = _model()
    start = _state(model)
    _train(tmp_path_factory.mktemp("ref"), model)
    return start, _state(model)


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_fixed_alpha_equals_dense_formula_on_every_tensor(tmp_path, full_run, alpha):
    start, end = full_run
    model = _model()
    _train(tmp_path, model, [WiseFTCallback(alpha=alpha, snapshot_device="cpu")])
    got = model.state_dict()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    for k in start:
        want = (1 - alpha) * start[k].double() + alpha * end[k].double()
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6, msg=k)
        if alpha == 0.0:
            assert torch.equal(got[k], start[k]), k
        if alpha == 1.0:
            assert torch.equal(got[k], end[k]), k


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"], **kw
    )
    return get_peft_model(model, cfg)


def _merged(peft_model):
    return {
        k: v.detach().clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()
    }


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(merged start, merged end, adapter state at the end) of a LoRA reference run without WiSE-FT."""
    pytest.importorskip("peft")
    ref = _lora(_model())
    start_merged = _merged(ref)
    _train(tmp_path_factory.mktemp("lora_ref"), ref)
    return start_merged, _merged(ref), {k: v.detach().clone() for k, v in ref.state_dict().items()}


def test_lora_scales_the_delta_exactly(tmp_path, lora_run):
    start_merged, end_merged, end_state = lora_run
    alpha = 0.4
    model = _lora(_model())
    cb = WiseFTCallback(alpha=alpha)
    _train(tmp_path, model, [cb])
    # nothing stored for the LoRA factors: only the (modules_to_save) head is snapshotted
    assert cb.weights.lora_b and all("lora" not in n for n in cb.weights.start.names)
    got = _merged(model)
    changed = 0
    for k in start_merged:
        want = (1 - alpha) * start_merged[k].double() + alpha * end_merged[k].double()
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-5, msg=k)
        changed += not torch.equal(start_merged[k], end_merged[k])
    assert changed > 4
    for name, p in model.state_dict().items():  # A keeps its fine-tuned value, B is scaled
        if "lora_A" in name:
            assert torch.equal(p, end_state[name]), name
        if "lora_B" in name:
            torch.testing.assert_close(p, alpha * end_state[name], msg=name)


def test_lora_endpoints_bit_exact(tmp_path, lora_run):
    start_merged, _, end_state = lora_run
    model = _lora(_model())
    _train(tmp_path / "a0", model, [WiseFTCallback(alpha=0.0)])
    for k, v in _merged(model).items():  # B = 0: the start model, whatever A holds
        assert torch.equal(v, start_merged[k]), k
    model = _lora(_model())
    _train(tmp_path / "a1", model, [WiseFTCallback(alpha=1.0)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, end_state[k]), k


@pytest.mark.parametrize("init", ["pissa", "olora", "trained"])
def test_nonzero_lora_start_is_refused(tmp_path, init):
    pytest.importorskip("peft")
    if init == "trained":
        model = _lora(_model())
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()  # an adapter that already carries a delta
    else:  # these inits also rewrite the base weights: W_res = W - B·A
        model = _lora(_model(), init_lora_weights=init)
    with pytest.raises(ValueError, match="lora_B.*non-zero"):
        _train(tmp_path, model, [WiseFTCallback(alpha=0.5)])


def test_options_are_validated():
    with pytest.raises(ValueError, match="outside"):
        WiseFTCallback(alpha=1.2)
    assert WiseFTCallback(alpha=1.2, extrapolate=True).alpha == 1.2
    with pytest.raises(ValueError, match="alphas"):
        WiseFTCallback(alphas=[0.0, -0.5], eval_datasets={"id": []})
    with pytest.raises(ValueError, match="id_dataset"):
        WiseFTCallback(eval_datasets={"a": [], "b": []}, id_dataset="c")
    with pytest.raises(ValueError, match="alpha"):
        WiseFTCallback()
    with pytest.raises(ValueError, match="method"):
        WiseFTCallback(alpha=0.5, method="cubic")


def _neg_mse(pred):
    p = torch.as_tensor(pred.predictions).reshape(-1)
    y = torch.as_tensor(pred.label_ids).reshape(-1)
    return {"neg_mse": -torch.mean((p - y) ** 2).item(), "mse": torch.mean((p - y) ** 2).item()}


@torch.no_grad()
def _outputs(model, ds):
    return model(input_ids=torch.tensor(ds["input_ids"])).logits.reshape(-1)


@pytest.mark.parametrize("metric,greater", [("neg_mse", True), ("eval_mse", False)])
def test_sweep_chooses_alpha_on_in_distribution_set_only(tmp_path, full_run, metric, greater):
    """ID targets are θ(0.7)'s outputs, shifted targets θ(0.2)'s: the shifted set would pick 0.2."""
    start, end = full_run
    probe = _model()
    targets = {}
    for name, a, seed in (("id", 0.7, 5), ("shifted", 0.2, 6)):
        probe.load_state_dict({k: (1 - a) * start[k] + a * end[k] for k in start})
        targets[name] = _data(32, seed, labels=_outputs(probe, _data(32, seed)))
    model = _model()
    grid = [0.0, 0.2, 0.5, 0.7, 1.0]
    cb = WiseFTCallback(
        eval_datasets=targets, id_dataset="id", metric=metric, greater_is_better=greater, alphas=grid
    )
    trainer = _trainer(tmp_path, model, [cb], compute_metrics=_neg_mse)
    trainer.train()
    curve = cb.curve
    assert cb.trainer is trainer  # found on the call stack
    assert curve.chosen_alpha == 0.7
    shifted = curve.results["shifted"]
    sign = 1 if greater else -1
    assert curve.alphas[max(range(len(shifted)), key=lambda i: sign * shifted[i])] == 0.2
    for k, v in model.state_dict().items():  # the chosen weights are left in the model
        torch.testing.assert_close(v, 0.3 * start[k] + 0.7 * end[k], rtol=0, atol=1e-6, msg=k)
    saved = json.loads((tmp_path / "wise_ft.json").read_text())
    assert saved["chosen_alpha"] == 0.7 and len(saved["results"]["shifted"]) == 5
    assert (tmp_path / "wise_ft.csv").read_text().count("\n") == 6
    assert (tmp_path / "wise_ft.png").stat().st_size > 1000
    logged = [h for h in trainer.state.log_history if "wise_ft_curve" in h]
    assert logged and logged[-1]["wise_ft_chosen_alpha"] == 0.7
    assert any(
        "wise_ft_a0.2_shifted_neg_mse" in h or "wise_ft_a0.2_shifted_mse" in h
        for h in trainer.state.log_history
    )


def test_sweep_restores_fine_tuned_weights_when_evaluation_fails(tmp_path, full_run):
    _, end = full_run

    def broken(pred):
        raise RuntimeError("metric exploded")

    model = _model()
    cb = WiseFTCallback(eval_datasets={"id": _data(16, 3)}, metric="neg_mse")
    trainer = _trainer(tmp_path, model, [cb], compute_metrics=broken)
    with pytest.raises(RuntimeError, match="exploded"):
        trainer.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, end[k]), k


def test_functional_api_matches_callback(full_run):
    start, end = full_run
    a, b, into = _model(), _model(), _model()
    a.load_state_dict(start)
    b.load_state_dict(end)
    sd = interpolate_models(a, b, 0.25, into=into)
    for k in start:
        torch.testing.assert_close(sd[k], 0.75 * start[k] + 0.25 * end[k])
        assert torch.equal(into.state_dict()[k], sd[k])


def test_resume_restores_the_start_snapshot(tmp_path, full_run):
    start, end = full_run
    model = _model()
    _train(tmp_path, model, [WiseFTCallback(alpha=0.5)], max_steps=6, save_strategy="steps", save_steps=3)
    once = _state(model)
    model2 = _model(seed=1)  # different init: the start must come from the checkpoint, not the live model
    trainer = _trainer(tmp_path, model2, [WiseFTCallback(alpha=0.5)], save_strategy="steps", save_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, once[k], rtol=0, atol=1e-6, msg=k)


def test_slerp_and_attach(tmp_path, full_run):
    from robustft.ops.interpolate import slerp

    start, end = full_run
    model = _model()
    trainer = _trainer(tmp_path, model)
    cb = WiseFTCallback(alpha=0.4, method="slerp").attach(trainer)
    assert cb in trainer.callback_handler.callbacks and cb.trainer is trainer
    trainer.train()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, slerp(start[k], end[k], 0.4), rtol=0, atol=1e-6, msg=k)


def test_sweep_at_eval_logs_curves_and_leaves_training_untouched(tmp_path, full_run):
    _, end = full_run
    model = _model()
    ds = _data(16, 3)
    cb = WiseFTCallback(
        alpha=1.0,
        eval_datasets={"id": ds},
        alphas=[0.0, 0.5, 1.0],
        metric="mse",
        greater_is_better=False,
        sweep_at_eval=True,
        save_curve=False,
    )
    trainer = _trainer(tmp_path, model, [cb], ds, _neg_mse, eval_strategy="steps", eval_steps=3)
    trainer.train()
    curves = [h for h in trainer.state.log_history if "wise_ft_curve" in h]
    assert [h["wise_ft_curve"]["step"] for h in curves] == [3, 6, 6]
    for k, v in model.state_dict().items():  # α=1 fixed: the run equals the reference run bit for bit
        assert torch.equal(v, end[k]), k


def test_manual_sweep_after_training(tmp_path, full_run):
    from robustft import wise_ft_sweep

    start, end = full_run
    model = _model()
    cb = WiseFTCallback(alpha=1.0)
    trainer = _trainer(tmp_path, model, [cb], compute_metrics=_neg_mse)
    trainer.train()
    ds = _data(16, 9)
    at_end = trainer.evaluate(eval_dataset=ds)["eval_mse"]
    curve = wise_ft_sweep(
        trainer,
        cb.weights,
        {"id": ds},
        "id",
        alphas=[0.0, 0.5, 1.0],
        metric="mse",
        greater_is_better=False,
        progress=False,
    )
    assert curve.value("id", 1.0) == pytest.approx(at_end, rel=1e-6)
    a = curve.chosen_alpha
    assert curve.value("id", a) == min(curve.results["id"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (1 - a) * start[k] + a * end[k], rtol=0, atol=1e-6, msg=k)


def test_sweep_without_a_trainer_fails_before_training():
    cb = WiseFTCallback(eval_datasets={"id": []})
    args = type("A", (), {"output_dir": "unused"})()
    state = type("S", (), {"global_step": 0})()
    with pytest.raises(ValueError, match="needs the Trainer"):
        cb.on_train_begin(args, state, None, model=_model())


@pytest.mark.parametrize("ema_first", [True, False])
def test_sweep_scores_the_live_weights_whatever_the_callback_order(tmp_path, ema_first):
    """An EMA wraps trainer.evaluate until its own on_train_end; the sweep must not score the EMA instead.

    Reference: the ID loss of θ(α) computed by hand from the start snapshot and the trained weights."""
    from robustft import EMACallback
    from tests.tiny import lm_dataset, tiny_llama, training_args

    model = tiny_llama()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    evals = {"id": lm_dataset(8, seed=1)}
    wise = WiseFTCallback(alpha=1.0, alphas=[0.0, 0.5, 1.0], eval_datasets=evals, metric="eval_loss",
                          greater_is_better=False, progress=False, save_curve=False)
    ema = EMACallback(decay=0.5, save_dir=None)
    callbacks = [ema, wise] if ema_first else [wise, ema]
    args = training_args(tmp_path, max_steps=4, learning_rate=2e-2)
    Trainer(model=model, args=args, train_dataset=lm_dataset(16), callbacks=callbacks).train()
    end = {n: p.detach().clone() for n, p in model.named_parameters()}  # alpha=1 applied: the trained weights
    batch = torch.tensor(evals["id"]["input_ids"])
    for alpha, got in zip(wise.curve.alphas, wise.curve.results["id"]):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_((1 - alpha) * start[n] + alpha * end[n])
            want = model(input_ids=batch, labels=batch).loss.item()
        assert got == pytest.approx(want, rel=1e-4), alpha


# -- α under a budget ----------------------------------------------------------------------------
def _dense_losses(start, end, alpha, sets):
    """MSE of θ(α) (the dense formula, a separate model) on each eval set: the brute-force curve."""
    probe = _model()
    probe.load_state_dict({k: (1 - alpha) * start[k] + alpha * end[k] for k in start})
    out = {}
    for name, ds in sets.items():
        y = torch.tensor(ds["labels"])
        out[name] = torch.mean((_outputs(probe, ds) - y) ** 2).item()
    return out


def test_sweep_under_a_budget_chooses_the_brute_force_alpha(tmp_path, full_run):
    """ID targets are θ(0.7)'s outputs, "retained" ones θ(0)'s (the start's own answers): the ID rule picks
    0.7; a budget on the retained loss, ε set between its values at α=0.2 and α=0.5, must pick 0.2."""
    start, end = full_run
    probe = _model()
    sets = {}
    for name, a, seed in (("id", 0.7, 5), ("retained", 0.0, 7)):
        probe.load_state_dict({k: (1 - a) * start[k] + a * end[k] for k in start})
        sets[name] = _data(32, seed, labels=_outputs(probe, _data(32, seed)))
    grid = [0.0, 0.2, 0.5, 0.7, 1.0]
    dense = {a: _dense_losses(start, end, a, sets) for a in grid}
    retained = [dense[a]["retained"] for a in grid]
    assert retained[0] < 1e-8 < retained[1] < retained[2]  # forgetting grows along the path
    eps = (retained[1] + retained[2]) / 2 - retained[0]
    admitted = [a for a in grid if dense[a]["retained"] <= retained[0] + eps]
    want = min(admitted, key=lambda a: (dense[a]["id"], a))
    assert want == 0.2 and min(grid, key=lambda a: dense[a]["id"]) == 0.7  # the budget binds

    model = _model()
    cb = WiseFTCallback(eval_datasets=sets, id_dataset="id", metric="eval_loss", greater_is_better=False,
                        alphas=grid, budget={"dataset": "retained", "epsilon": eps}, progress=False)
    trainer = _trainer(tmp_path, model, [cb])
    trainer.train()
    curve = cb.curve
    assert curve.chosen_alpha == want and curve.extra["id_rule_alpha"] == 0.7 and curve.rule == "budget"
    for a, got in zip(grid, curve.constraint):
        assert got == pytest.approx(dense[a]["retained"], rel=1e-4, abs=1e-7), a
    for k, v in model.state_dict().items():  # θ(α*) is left in the model
        torch.testing.assert_close(v, 0.8 * start[k] + 0.2 * end[k], rtol=0, atol=1e-6, msg=k)
    logged = [h for h in trainer.state.log_history if "wise_ft_curve" in h][-1]
    assert logged["wise_ft_id_rule_alpha"] == 0.7
    assert logged["wise_ft_budget_limit"] == pytest.approx(retained[0] + eps, rel=1e-4, abs=1e-7)
    saved = json.loads((tmp_path / "wise_ft.json").read_text())
    assert saved["rule"] == "budget" and saved["budget"]["epsilon"] == eps
    assert "admitted" in (tmp_path / "wise_ft.csv").read_text().splitlines()[0]


def test_the_default_rule_is_unchanged(tmp_path, full_run):
    """Without a budget the same run chooses on the ID set alone, and the files keep their columns."""
    start, end = full_run
    probe = _model()
    probe.load_state_dict({k: 0.3 * start[k] + 0.7 * end[k] for k in start})
    sets = {"id": _data(32, 5, labels=_outputs(probe, _data(32, 5))), "retained": _data(32, 7)}
    cb = WiseFTCallback(eval_datasets=sets, id_dataset="id", metric="eval_loss", greater_is_better=False,
                        alphas=[0.0, 0.2, 0.5, 0.7, 1.0], progress=False)
    _train(tmp_path, _model(), [cb])
    assert cb.curve.chosen_alpha == 0.7 and cb.curve.rule == "id" and cb.curve.budget is None
    header = (tmp_path / "wise_ft.csv").read_text().splitlines()[0]
    assert header == "alpha,id_eval_loss,retained_eval_loss,chosen"


def test_budget_options_are_checked_before_training():
    sets = {"id": [], "retained": []}
    with pytest.raises(ValueError, match="budget.dataset: 'other'"):
        WiseFTCallback(eval_datasets=sets, id_dataset="id", budget={"dataset": "other"})
    with pytest.raises(ValueError, match="lacks; add 0"):
        WiseFTCallback(eval_datasets=sets, id_dataset="id", alphas=[0.5, 1], budget={"dataset": "retained"})
    with pytest.raises(ValueError, match="give eval_datasets"):
        WiseFTCallback(alpha=0.5, budget={"dataset": "retained"})
    with pytest.raises(ValueError, match="budget.epsilon"):
        WiseFTCallback(eval_datasets=sets, id_dataset="id", budget={"dataset": "retained", "epsilon": "0.1"})


def test_lora_sweep_copies_no_base_weight(tmp_path, monkeypatch):
    """For LoRA the curve scales the adapter: everything snapshotted during training and the budgeted sweep
    is the adapter's own factors (the sweep's copy of the fine-tuned A and B), never a base weight."""
    from peft import LoraConfig, get_peft_model

    from robustft.core.params import Snapshot

    copied: list[tuple[str, int]] = []
    original = Snapshot.of.__func__

    def spy(cls, params, *args, **kwargs):
        snap = original(cls, params, *args, **kwargs)
        copied.extend((n, t.numel()) for n, t in zip(snap.names, snap.tensors))
        return snap

    monkeypatch.setattr(Snapshot, "of", classmethod(spy))
    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    adapter = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    b_numel = sum(v for n, v in adapter.items() if "lora_B" in n)
    sets = {"id": _data(16, 5), "retained": _data(16, 7)}
    cb = WiseFTCallback(eval_datasets=sets, id_dataset="id", metric="eval_loss", greater_is_better=False,
                        alphas=[0.0, 0.5, 1.0], budget={"dataset": "retained", "epsilon": 0.5},
                        progress=False, save_curve=False)
    _train(tmp_path, model, [cb])
    assert cb.weights.stored_numel() == 0  # the start of B is known to be 0: nothing is kept for it
    assert copied and all(n in adapter for n, _ in copied), [n for n, _ in copied if n not in adapter][:3]
    assert sum(v for n, v in copied if "lora_B" in n) == b_numel  # the sweep's one copy of B
    total = sum(p.numel() for p in model.parameters())
    assert sum(v for _, v in copied) == sum(adapter.values()) < total / 10
