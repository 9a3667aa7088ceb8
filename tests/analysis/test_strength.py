import json
import math
import warnings

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from robustft import L2SPCallback, WiseFTCallback
from robustft.analysis.strength import StrengthCurve, check_strengths, strength_sweep
from robustft.interpolation.wise_ft import AlphaBudget

VOCAB = 64
ALPHAS = [0.0, 0.5, 1.0]


# -- a scripted trainer: the metric of every (strength, eval set) is given, so the choice can be checked
class Marker(TrainerCallback):
    def __init__(self, strength):
        self.strength = strength


class ScriptedTrainer:
    """``evaluate`` returns ``table[strength][set]`` (metric, loss); records which sets were read."""

    def __init__(self, table, callbacks, reads):
        self.model = nn.Linear(2, 2)
        self.strength = callbacks[0].strength
        self.table, self.reads, self.trained = table, reads, False

    def train(self):
        self.trained = True

    def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
        self.reads.append(eval_dataset)
        row = self.strength if self.trained or "start" not in self.table else "start"  # before train(): start
        acc, loss = self.table[row][eval_dataset]
        return {f"{metric_key_prefix}_accuracy": acc, f"{metric_key_prefix}_loss": loss}


def scripted_sweep(table, strengths, evals=("id", "shifted"), **kw):
    reads = []
    curve = strength_sweep(lambda cbs: ScriptedTrainer(table, cbs, reads), Marker, strengths,
                           {e: e for e in evals}, "id", **kw)
    return curve, reads


def brute_force(values, losses, strengths, greater=True):
    """argbest of the ID metric, ties to the lower ID loss, then to the smaller strength."""
    sign = 1 if greater else -1
    return min(zip(values, losses, strengths), key=lambda t: (-sign * t[0], t[1], t[2]))[2]


@pytest.mark.parametrize("greater", [True, False])
def test_the_chosen_strength_equals_brute_force_over_the_table(greater):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        strengths = sorted(torch.rand(6, generator=g).mul(10).tolist())
        acc = torch.randint(0, 3, (6,), generator=g).div(4).tolist()  # many ties
        loss = torch.randint(0, 2, (6,), generator=g).float().tolist()  # ties of the tie-break too
        table = {s: {"id": (a, lo), "shifted": (0.5, 0.0)}
                 for s, a, lo in zip(strengths, acc, loss, strict=True)}
        curve, _ = scripted_sweep(table, list(reversed(strengths)), greater_is_better=greater)
        assert curve.strengths == strengths
        assert curve.chosen_strength == brute_force(acc, loss, strengths, greater), trial
        assert curve.results["id"] == acc and curve.id_loss == loss
        assert curve.trainer.strength == curve.chosen_strength  # the chosen run's Trainer is the one kept


def test_the_choice_never_reads_the_shifted_sets():
    strengths = [0.0, 0.1, 1.0, 10.0]
    ids = {0.0: 0.7, 0.1: 0.9, 1.0: 0.8, 10.0: 0.6}
    chosen = set()
    for shifted in ([0.1, 0.2, 0.3, 0.9], [0.9, 0.3, 0.2, 0.1], [math.nan] * 4):
        table = {s: {"id": (ids[s], 1.0), "shifted": (v, 1.0), "other": (v, 1.0)}
                 for s, v in zip(strengths, shifted, strict=True)}
        curve, reads = scripted_sweep(table, strengths, evals=("id", "shifted", "other"))
        chosen.add(curve.chosen_strength)
        assert reads.count("shifted") == len(strengths)  # reported for every run, never more
    assert chosen == {0.1}


def test_strength_curve_files_and_table(tmp_path):
    table = {s: {"id": (a, 0.0), "shifted": (b, 0.0)} for s, a, b in ((0.001, 0.6, 0.7), (0.5, 0.9, 0.4))}
    curve, _ = scripted_sweep(table, [0.5, 0.001], name="λ", output_dir=tmp_path)
    saved = json.loads((tmp_path / "strength.json").read_text())
    assert saved["chosen_strength"] == 0.5 and saved["strengths"] == [0.001, 0.5] and saved["axis"] == "λ"
    assert (tmp_path / "strength.csv").read_text().splitlines()[0].startswith("λ,")
    assert (tmp_path / "strength.png").stat().st_size > 1000
    text = curve.table()
    assert "0.001" in text and "start" not in text and "fine-tuned" not in text and "<- chosen on id" in text
    assert isinstance(curve, StrengthCurve) and curve.value("shifted", 0.001) == 0.7


def brute_force_budget(values, losses, retained, start, eps, strengths, greater=True):
    """The budget rule written out: among the runs with retained loss <= start + eps, argbest ID metric (ties:
    lower ID loss, then smaller strength); none: the smallest excess, ties the same way."""
    sign = 1 if greater else -1
    rows = list(zip(values, losses, strengths, [r - (start + eps) for r in retained]))
    admitted = [r for r in rows if r[3] <= 0]
    if not admitted:
        least = min(r[3] for r in rows)
        admitted = [r for r in rows if r[3] == least]
    return min(admitted, key=lambda t: (-sign * t[0], t[1], t[2]))[2]


@pytest.mark.parametrize("greater", [True, False])
def test_the_strength_chosen_under_a_budget_equals_brute_force(greater):
    g = torch.Generator().manual_seed(1)
    fallbacks = 0
    for trial in range(40):
        strengths = sorted(torch.rand(5, generator=g).mul(10).tolist())
        acc = torch.randint(0, 3, (5,), generator=g).div(4).tolist()
        loss = torch.randint(0, 2, (5,), generator=g).float().tolist()
        retained = torch.randint(0, 5, (5,), generator=g).div(10).add(0.6).tolist()  # 0.6 .. 1.0
        start, eps = 0.6, [0.0, 0.1, 0.2][trial % 3]
        table = {s: {"id": (a, lo), "shifted": (0.5, 0.0), "retained": (0.0, r)}
                 for s, a, lo, r in zip(strengths, acc, loss, retained, strict=True)}
        table["start"] = {"retained": (0.0, start)}
        want = brute_force_budget(acc, loss, retained, start, eps, strengths, greater)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            curve, reads = scripted_sweep(table, strengths, evals=("id", "shifted", "retained"),
                                          greater_is_better=greater,
                                          budget={"dataset": "retained", "epsilon": eps})
        assert curve.chosen_strength == want, trial
        assert curve.curve.constraint == retained and curve.curve.budget_start == start
        assert curve.curve.extra["id_rule_alpha"] == brute_force(acc, loss, strengths, greater)
        assert reads.count("retained") == len(strengths) + 1  # each run, and the start model once
        over = all(r > start + eps for r in retained)
        fallbacks += over
        named = [w for w in caught if "retained loss <= value of the start model" in str(w.message)]
        assert len(named) == int(over), trial  # one warning naming the budget, only when none is admitted
    assert 0 < fallbacks < 40  # both branches were exercised


def test_a_budget_is_recorded_in_the_json_table_csv_and_plot(tmp_path):
    table = {0.01: {"id": (0.9, 0.1), "retained": (0.0, 1.5)},
             1.0: {"id": (0.8, 0.2), "retained": (0.0, 1.05)}, "start": {"retained": (0.0, 1.0)}}
    curve, _ = scripted_sweep(table, [0.01, 1.0], evals=("id", "retained"), name="λ", output_dir=tmp_path,
                              budget=AlphaBudget("retained", epsilon=0.1))
    assert curve.chosen_strength == 1.0  # 0.01 has the better ID metric but forgot too much
    saved = json.loads((tmp_path / "strength.json").read_text())
    assert saved["rule"] == "budget" and saved["budget"]["epsilon"] == 0.1 and saved["budget_start"] == 1.0
    assert saved["budget_limit"] == pytest.approx(1.1) and saved["constraint"] == [1.5, 1.05]
    assert saved["id_rule_strength"] == 0.01 and saved["chosen_strength"] == 1.0
    text = curve.table()
    assert "retained loss <= value of the start model + 0.1 (= 1.1)" in text.splitlines()[0]
    lines = text.splitlines()
    assert "over budget" in lines[3] and "<- chosen on id under the budget" in lines[4]
    csv = (tmp_path / "strength.csv").read_text().splitlines()
    assert csv[0].endswith("budget_retained_loss,admitted")
    assert csv[1].endswith(",0") and csv[2].endswith(",1")
    assert (tmp_path / "strength.png").stat().st_size > 1000


def test_a_bad_budget_is_refused_before_any_training():
    def make_trainer(callbacks):
        raise AssertionError("no Trainer may be built")

    evals = {"id": 0, "retained": 1}
    with pytest.raises(ValueError, match="budget.dataset: 'kept'"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id", budget={"dataset": "kept"})
    with pytest.raises(ValueError, match="budget: unknown keys"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id", budget={"dataset": "retained", "eps": 1})
    with pytest.raises(ValueError, match="budget.epsilon"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id",
                       budget={"dataset": "retained", "epsilon": -1})
    with pytest.raises(ValueError, match="lack; add 0"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id", wise_ft="each", alphas=[0.5, 1.0],
                       budget={"dataset": "retained"})


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty"), ("0.1", "non-empty"), ([0.1, "x"], "'x' is not a real number"),
    ([0.1, True], "True is not a real number"), ([float("nan")], "not finite"), ([0.1, 0.1], "repeated"),
])
def test_bad_strengths_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        check_strengths(bad)


def test_bad_input_is_refused_before_any_training():
    built = []

    def make_trainer(callbacks):
        built.append(callbacks)
        raise AssertionError("no Trainer may be built")

    evals = {"id": 0, "shifted": 1}
    with pytest.raises(ValueError, match="strengths"):
        strength_sweep(make_trainer, Marker, [0.1, float("inf")], evals, "id")
    with pytest.raises(ValueError, match="id_dataset: 'val'"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "val")
    with pytest.raises(ValueError, match="wise_ft: "):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id", wise_ft="all")
    with pytest.raises(ValueError, match="alphas"):
        strength_sweep(make_trainer, Marker, [0.1], evals, "id", wise_ft="each", alphas=[0.5, 2.0])
    with pytest.raises(TypeError, match=r"make_callback\(0.1\) returned float"):
        strength_sweep(make_trainer, lambda s: s, [0.1, 1.0], evals, "id")
    with pytest.raises(ValueError, match="strength"):  # the callback's own check, for every strength first
        strength_sweep(make_trainer, L2SPCallback, [0.1, -1.0], evals, "id")
    assert built == []


# -- real Trainer runs on a tiny BERT ----------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=1,
                     problem_type="regression",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids.float().mean(1) / VOCAB).tolist()
                              if seed % 2 else torch.randn(n, generator=g).tolist()})


def _neg_mse(pred):
    p = torch.as_tensor(pred.predictions).reshape(-1)
    y = torch.as_tensor(pred.label_ids).reshape(-1)
    return {"neg_mse": -torch.mean((p - y) ** 2).item()}


EVALS = {"id": _data(24, 3), "shifted": _data(24, 4)}


def _trainer(tmp_path, callbacks):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                             per_device_eval_batch_size=24,
                             max_steps=6, learning_rate=2e-2, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0, disable_tqdm=True)
    return Trainer(model=_model(), args=args, train_dataset=_data(48, 1), callbacks=list(callbacks),
                   compute_metrics=_neg_mse)


def _distance(model, start):
    return sum((p.detach() - start[n]).pow(2).sum().item() for n, p in model.named_parameters())


@pytest.mark.slow  # real Trainer runs (a few seconds each on a loaded machine)
def test_a_real_trainer_run_per_strength_equals_training_with_that_callback(tmp_path):
    strengths = [0.0, 1.0, 100.0]
    curve = strength_sweep(lambda cbs: _trainer(tmp_path, cbs), L2SPCallback, strengths, EVALS, "id",
                           metric="neg_mse", name="λ", output_dir=tmp_path)
    start = dict(_model().named_parameters())
    distances = []
    for s in strengths:  # the reference: the same Trainer with L2SPCallback(s), evaluated by hand
        ref = _trainer(tmp_path, [L2SPCallback(s)])
        ref.train()
        for name, ds in EVALS.items():
            want = ref.evaluate(eval_dataset=ds)["eval_neg_mse"]
            assert curve.value(name, s) == pytest.approx(want, rel=1e-6, abs=1e-7), (s, name)
        distances.append(_distance(ref.model, start))
    assert distances[0] > distances[1] > distances[2]  # the strengths did act
    ids = curve.results["id"]
    assert curve.chosen_strength == strengths[max(range(3), key=lambda i: (ids[i], -i))]
    assert curve.alphas == [None] * 3 and json.loads((tmp_path / "strength.json").read_text())["axis"] == "λ"


@pytest.mark.slow  # real Trainer runs (a few seconds each on a loaded machine)
def test_wise_ft_on_each_run_equals_a_wise_ft_callback_per_run(tmp_path):
    strengths = [0.0, 1.0, 100.0]
    curve = strength_sweep(lambda cbs: _trainer(tmp_path, cbs), L2SPCallback, strengths, EVALS, "id",
                           metric="neg_mse", wise_ft="each", alphas=ALPHAS)
    for i, s in enumerate(strengths):
        wise = WiseFTCallback(eval_datasets=EVALS, id_dataset="id", metric="neg_mse", alphas=ALPHAS,
                              save_curve=False, progress=False)
        _trainer(tmp_path, [L2SPCallback(s), wise]).train()
        assert curve.alphas[i] == wise.curve.chosen_alpha, s
        got = curve.wise_ft[f"{s:g}"]["results"]
        for name in EVALS:
            assert got[name] == pytest.approx(wise.curve.results[name], rel=1e-6, abs=1e-7), (s, name)
            assert curve.value(name, s) == pytest.approx(wise.curve.value(name, wise.curve.chosen_alpha),
                                                         rel=1e-6, abs=1e-7)
    ids = curve.results["id"]
    assert curve.chosen_strength == brute_force(ids, curve.id_loss, strengths)
    assert "α*=" in curve.table()


@pytest.mark.slow  # real Trainer runs (a few seconds each on a loaded machine)
def test_wise_ft_on_the_chosen_run_only(tmp_path):
    strengths = [0.0, 100.0]
    curve = strength_sweep(lambda cbs: _trainer(tmp_path, cbs), L2SPCallback, strengths, EVALS, "id",
                           metric="neg_mse", wise_ft="chosen", alphas=ALPHAS)
    assert list(curve.wise_ft) == [f"{curve.chosen_strength:g}"] and curve.alphas == [None, None]
    wise = curve.wise_ft[f"{curve.chosen_strength:g}"]
    assert wise["results"]["id"][-1] == pytest.approx(curve.value("id", curve.chosen_strength), rel=1e-6)
    ref = _trainer(tmp_path, [L2SPCallback(curve.chosen_strength)])
    ref.train()
    alpha = wise["chosen_alpha"]
    start = _model().state_dict()
    for name, p in curve.trainer.model.named_parameters():  # the kept model is at θ(α*) of the chosen run
        want = (1 - alpha) * start[name] + alpha * ref.model.state_dict()[name]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # real Trainer runs (a few seconds each on a loaded machine)
def test_a_budget_on_real_trainer_runs_reads_each_runs_loss_and_the_untrained_start(tmp_path):
    strengths = [0.0, 1.0, 100.0]
    curve = strength_sweep(lambda cbs: _trainer(tmp_path, cbs), L2SPCallback, strengths, EVALS, "id",
                           metric="neg_mse", name="λ", budget={"dataset": "shifted", "epsilon": 0.01})
    start = _trainer(tmp_path, []).evaluate(eval_dataset=EVALS["shifted"])["eval_loss"]  # untrained
    assert curve.curve.budget_start == pytest.approx(start, rel=1e-6)
    held = []
    for s in strengths:  # the reference: each strength's run, its shifted loss read by hand
        ref = _trainer(tmp_path, [L2SPCallback(s)])
        ref.train()
        held.append(ref.evaluate(eval_dataset=EVALS["shifted"])["eval_loss"])
    assert curve.curve.constraint == pytest.approx(held, rel=1e-6)
    ids = curve.results["id"]
    assert curve.chosen_strength == brute_force_budget(ids, curve.id_loss, held, start, 0.01, strengths)
