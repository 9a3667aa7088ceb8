"""DaWin through a real Trainer: the callback's report against a computation by hand, K=1 against the static
sweep at α = mean λ on saved checkpoints, and a causal LM's sequence entropy."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer

from robustft import WiseFTCallback
from robustft.interpolation.dawin import dawin_evaluate
from robustft.interpolation.wise_ft import WiseFTWeights, interpolate_models, wise_ft_sweep
from robustft.ops.dawin import (
    causal_lm_mask,
    component_alphas,
    dawin_lambda,
    fit_beta_mixture,
    fit_beta_mixture_kmeans,
    prediction_entropy,
)
from tests.tiny import lm_dataset, tiny_bert, tiny_llama, token_dataset, training_args


def accuracy(pred):
    return {"accuracy": float((np.asarray(pred.predictions).argmax(-1) == pred.label_ids).mean())}


def _sets():
    return {"id": token_dataset(48, seed=5), "shifted": token_dataset(40, seed=6)}


def _train(tmp_path, callbacks=()):
    model = tiny_bert(0)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=token_dataset(64),
                      compute_metrics=accuracy, callbacks=list(callbacks))
    trainer.train()
    return trainer


@torch.no_grad()
def _by_hand(start, end, ds, k, procedure="paper"):
    """λ from the two models' logits, the mixture, and the accuracy of θ(α of its component) per input: the
    paper's α_k = a_k/(a_k+b_k) of a k-means-initialised fit, or the mean λ of the routed inputs."""
    ids, labels = torch.tensor(ds["input_ids"]), torch.tensor(ds["labels"])
    lam = dawin_lambda(prediction_entropy(start(input_ids=ids).logits.double()),
                       prediction_entropy(end(input_ids=ids).logits.double()))
    if procedure == "paper":
        mixture = fit_beta_mixture_kmeans(lam, k, n_init=3, seed=1)
        alphas, groups = component_alphas(lam, mixture.assign(lam), mixture)
    else:
        alphas, groups = component_alphas(lam, fit_beta_mixture(lam, k).assign(lam))
    correct = 0
    for alpha, group in zip(alphas, groups, strict=True):
        model = copy.deepcopy(end)
        interpolate_models(start, end, alpha, into=model)
        for j in group.tolist():  # one input at a time
            correct += int(model(input_ids=ids[j : j + 1]).logits.argmax(-1).item() == labels[j].item())
    return correct / len(labels), alphas, [len(g) for g in groups]


@pytest.mark.slow  # a Trainer run with sweeps (~10 s quiet)
def test_callback_reports_dawin_beside_the_curve_on_every_eval_set(tmp_path):
    cb = WiseFTCallback(alpha=1.0, eval_datasets=_sets(), id_dataset="id", dynamic="dawin", n_components=2,
                        progress=False)
    trainer = _train(tmp_path, [cb])
    start = tiny_bert(0).eval()  # the same seed: the weights training started from
    end = trainer.model.eval()  # alpha=1.0: the model is left at θ_end
    assert cb.dawin is not None and set(cb.dawin.results) == {"id", "shifted"}
    final = trainer.state.log_history[-1]
    for name, ds in _sets().items():
        acc, alphas, counts = _by_hand(start, end, ds, 2)
        assert cb.dawin.results[name] == pytest.approx(acc, abs=1e-12), name
        assert cb.dawin.alphas[name] == pytest.approx(alphas, rel=1e-5) and cb.dawin.counts[name] == counts
        assert 0 < min(alphas) and max(alphas) < 1
        assert final[f"dawin_{name}_accuracy"] == cb.dawin.results[name]
    saved = json.loads((tmp_path / "wise_ft.json").read_text())
    assert saved["extra"]["dawin"]["results"] == cb.dawin.results
    assert trainer.compute_metrics is accuracy and trainer.preprocess_logits_for_metrics is None


@pytest.mark.parametrize("procedure", ["paper", "routed_mean"])
def test_dawin_evaluate_equals_the_procedure_by_hand(tmp_path, procedure):
    """Both procedures through the Trainer's loop against one interpolated model per component, by hand."""
    start, end = tiny_bert(1).eval(), tiny_bert(0)
    with torch.no_grad():  # a confident end model on part of the inputs: λ spread over (0, 1)
        for name, p in end.named_parameters():
            if name.startswith("classifier"):
                p.mul_(40)
    trainer = Trainer(model=end, args=training_args(tmp_path), compute_metrics=accuracy)
    ds = token_dataset(40, seed=6)
    result = dawin_evaluate(trainer, WiseFTWeights.from_models(start, end), {"s": ds}, n_components=3,
                            procedure=procedure)
    acc, alphas, counts = _by_hand(start, end.eval(), ds, 3, procedure)
    assert result.procedure == procedure and result.counts["s"] == counts and len(counts) >= 2
    assert result.alphas["s"] == pytest.approx(alphas, rel=1e-5)
    assert result.results["s"] == pytest.approx(acc, abs=1e-12)


def test_one_component_on_saved_checkpoints_equals_the_static_sweep_at_the_mean_lambda(tmp_path):
    trainer = _train(tmp_path / "run")
    trainer.model.save_pretrained(tmp_path / "ft")
    start = tiny_bert(0)
    start.save_pretrained(tmp_path / "start")
    # after training, from the saved folders: two models in memory, a Trainer only to evaluate
    start = AutoModelForSequenceClassification.from_pretrained(tmp_path / "start")
    end = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft")
    evaluator = Trainer(model=end, args=training_args(tmp_path / "eval"), compute_metrics=accuracy)
    weights = WiseFTWeights.from_models(start, end)
    ft_state = {k: v.clone() for k, v in end.state_dict().items()}
    sets = _sets()
    dawin = dawin_evaluate(evaluator, weights, sets, n_components=1)
    for k, v in end.state_dict().items():
        assert torch.equal(v, ft_state[k]), k  # left at θ_end
    for name, ds in sets.items():
        (alpha,) = dawin.alphas[name]
        assert alpha == pytest.approx(dawin.mean_lambda[name], abs=1e-12) and dawin.counts[name] == [len(ds)]
        curve = wise_ft_sweep(evaluator, weights, {name: ds}, name, alphas=[alpha], progress=False)
        assert dawin.results[name] == curve.results[name][0]
        assert dawin.loss[name] == pytest.approx(curve.extra["id_loss"][0], rel=1e-6)
        end.load_state_dict(ft_state)
        by_loss = dawin_evaluate(evaluator, weights, {name: ds}, n_components=1, metric="loss")
        assert by_loss.results[name] == dawin.loss[name]
        end.load_state_dict(ft_state)


def test_causal_lm_entropy_is_the_mean_next_token_entropy(tmp_path):
    start = tiny_llama(0)
    model = copy.deepcopy(start)
    trainer = Trainer(
        model=model, args=training_args(tmp_path, max_steps=4), train_dataset=lm_dataset(32),
        compute_metrics=lambda p: {"accuracy": float((p.predictions[:, :-1] == p.label_ids[:, 1:]).mean())},
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    cb = WiseFTCallback(alpha=1.0).attach(trainer)
    trainer.train()
    ds = lm_dataset(24, seed=3)
    result = dawin_evaluate(trainer, cb.weights, {"lm": ds}, n_components=2)
    ids = torch.tensor(ds["input_ids"])
    with torch.no_grad():
        h = [prediction_entropy(m.eval()(input_ids=ids).logits.double(), causal_lm_mask(ids))
             for m in (start, model)]
    assert result.mean_lambda["lm"] == pytest.approx(float(dawin_lambda(*h).mean()), rel=1e-5)
    assert 0.0 <= result.results["lm"] <= 1.0 and sum(result.counts["lm"]) == len(ds)


def test_options_are_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match="dynamic: 'nope'"):
        WiseFTCallback(eval_datasets=_sets(), id_dataset="id", dynamic="nope")
    with pytest.raises(ValueError, match="measured on eval_datasets"):
        WiseFTCallback(alpha=0.5, dynamic="dawin")
    with pytest.raises(ValueError, match="n_components"):
        WiseFTCallback(eval_datasets=_sets(), id_dataset="id", dynamic="dawin", n_components=0)
    with pytest.raises(ValueError, match="procedure: 'mean'"):
        WiseFTCallback(eval_datasets=_sets(), id_dataset="id", dynamic="dawin", dawin_procedure="mean")


def test_without_compute_metrics_it_fails_before_the_first_step(tmp_path):
    model = tiny_bert(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = WiseFTCallback(eval_datasets=_sets(), id_dataset="id", dynamic="dawin")
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset(16),
                      callbacks=[cb])
    with pytest.raises(ValueError, match="compute_metrics"):
        trainer.train()
    assert trainer.state.global_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow  # a Trainer run with sweeps (~10 s quiet)
def test_dawin_leaves_the_static_sweep_and_its_chosen_model_unchanged(tmp_path):
    runs = []
    for dynamic in (None, "dawin"):
        cb = WiseFTCallback(eval_datasets=_sets(), id_dataset="id", dynamic=dynamic, progress=False)
        trainer = _train(tmp_path / str(dynamic), [cb])
        runs.append((cb.curve, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (plain, plain_state), (with_dawin, dawin_state) = runs
    assert with_dawin.results == plain.results and with_dawin.chosen_alpha == plain.chosen_alpha
    assert "dawin" in with_dawin.extra and "dawin" not in plain.extra
    for k, v in plain_state.items():
        assert torch.equal(dawin_state[k], v), k  # θ(α*) bit for bit


def test_dawin_by_loss_is_refused_on_several_ranks_before_any_prediction(tmp_path, monkeypatch):
    """The Trainer's eval loss is inexact under DDP (padding samples): refused before anything runs."""
    from robustft.core import distributed

    model = tiny_bert(0)
    trainer = Trainer(model=model, args=training_args(tmp_path), compute_metrics=accuracy)
    weights = WiseFTWeights.from_models(tiny_bert(1), model)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(trainer, "predict", lambda *a, **k: pytest.fail("predicted before refusing"))
    with pytest.raises(ValueError, match="metric='loss' is refused on 2 ranks"):
        dawin_evaluate(trainer, weights, _sets(), metric="loss")
    cb = WiseFTCallback(alpha=1.0, eval_datasets=_sets(), id_dataset="id", metric="loss", dynamic="dawin",
                        progress=False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=token_dataset(8),
                      compute_metrics=accuracy, callbacks=[cb])
    with pytest.raises(ValueError, match="metric='loss' is refused on 2 ranks"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_set_without_labels_gets_no_metric_as_in_trainer_evaluate(tmp_path):
    """compute_metrics is never called with label_ids=None (it scored 0.0 before): the set is listed as
    unlabeled, with a warning, its components still reported; a labelled set beside it is unchanged."""
    model = tiny_bert(0)
    calls = []

    def metric(pred):
        calls.append(pred.label_ids is None)
        return accuracy(pred)

    trainer = Trainer(model=model, args=training_args(tmp_path), compute_metrics=metric)
    weights = WiseFTWeights.from_models(tiny_bert(1), model)
    plain = trainer.evaluate(eval_dataset=token_dataset(40, seed=6).remove_columns("labels"))
    assert "eval_accuracy" not in plain and "eval_loss" not in plain and calls == []  # the Trainer's rule
    sets = {"id": token_dataset(48, seed=5), "raw": token_dataset(40, seed=6).remove_columns("labels")}
    with pytest.warns(RuntimeWarning, match=r"no labels in the eval set\(s\) \['raw'\]"):
        both = dawin_evaluate(trainer, weights, sets, n_components=2)
    assert True not in calls
    assert "raw" not in both.results and "raw" not in both.loss and both.unlabeled == ["raw"]
    assert sum(both.counts["raw"]) == 40 and 0 < both.mean_lambda["raw"] < 1
    alone = dawin_evaluate(trainer, weights, {"id": sets["id"]}, n_components=2)
    assert both.results == alone.results and alone.unlabeled == []
    assert " - " in both.table().splitlines()[-1]
    with pytest.warns(RuntimeWarning, match="no labels"):
        by_loss = dawin_evaluate(trainer, weights, {"raw": sets["raw"]}, metric="loss")
    assert by_loss.results == {} and by_loss.unlabeled == ["raw"]


def test_the_sweep_names_a_set_without_labels(tmp_path):
    """The static sweep needs the metric at every α: a set without labels is a named error (not 0.0)."""
    model = tiny_bert(0)
    trainer = Trainer(model=model, args=training_args(tmp_path), compute_metrics=accuracy)
    weights = WiseFTWeights.from_models(tiny_bert(1), model)
    raw = {"raw": token_dataset(16, seed=6).remove_columns("labels")}
    with pytest.raises(ValueError, match=r"'accuracy' not in the evaluation results of 'raw'.*have labels"):
        wise_ft_sweep(trainer, weights, raw, "raw", alphas=[0.5], progress=False)
