"""benchmarks/strength.py on a tiny model: one JSON per method, its rows in the section, the choice on id."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_each_method_gives_its_json_and_its_rows(tmp_path):
    from benchmarks import strength as bs
    from tests.tiny import tiny_task

    task = tiny_task()
    for method in ("plain", "L2-SP", "EWC"):
        bs.run_method(task, method, tmp_path, scales=(0.01, 1.0))
    text = bs.section("tiny", tmp_path, "cmd")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    assert [(r[0], r[1]) for r in rows[1:]][:3] == [("plain", "0"), ("L2-SP", "0.01"), ("L2-SP", "1")]
    assert [r[0] for r in rows[1:]].count("EWC") == 2 and "`cmd`" in text
    for method in ("L2-SP", "EWC"):
        data = json.loads((tmp_path / f"{method}.json").read_text())
        best = min(zip(data["results"]["id"], data["id_loss"], data["strengths"], strict=True),
                   key=lambda t: (-t[0], t[1], t[2]))[2]  # brute force: best id, lower id loss, smaller
        assert data["chosen_strength"] == best
        chosen = [r for r in rows if r[0] == method and r[-1] == "chosen on id"]
        assert len(chosen) == 1 and float(chosen[0][1]) == pytest.approx(best, rel=1e-3)
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert list(plain["wise_ft"]["0"]["alphas"]) == list(bs.ALPHAS)  # plain fine-tuning's own WiSE-FT curve


@pytest.mark.slow
def test_llm_task_sweeps_lora_losses_and_chooses_the_lowest_id_loss(tmp_path):
    """``--task llm`` on a tiny Llama with the demo's tokenizer and chat rows: loss columns for id, shifted
    and retained, the strength chosen on the lowest id loss (brute force), plain's end point the demo's own
    score of a LoRA run trained apart (``demo_llm.lora_trainer`` + ``evaluate_losses``)."""
    from benchmarks import strength as bs
    from robustft.demos import llm as demo_llm
    from tests.tiny import tiny_llm_task

    task = tiny_llm_task(tmp_path / "model", bs.LLM_EVALS, shift=True)
    if task is None:
        pytest.skip("the LLM demo's model is not in the cache (robustft demo --llm sets it up)")
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=4, steps=2, batch_size=4, rank=2, learning_rate=0.05)
    out = tmp_path / "out"
    bench = bs.llm_bench(task, cfg, out, scales=(0.01, 100.0))
    for method in bs.LLM_METHODS:
        bs.run_method(bench, method, out)
    text = bs.section("llm", out, "cmd", per_method=False)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert table[0][2:5] == ["id end", "shifted end", "retained end"] and "answer-token loss" in text
    assert [r[0] for r in table[1:]] == ["plain", *["L2-SP"] * 2, *["EWC"] * 2, *["spectral"] * 2,
                                         *["EMA"] * 3, *["Momentum-SAM"] * 3]
    for method in ("L2-SP", "EWC", "spectral", "EMA", "Momentum-SAM"):
        data = json.loads((out / f"{method}.json").read_text())
        assert data["greater_is_better"] is False and list(data["results"]) == list(bs.LLM_EVALS)
        best = min(zip(data["results"]["id"], data["strengths"], strict=True))[1]  # lowest id loss, smaller
        assert data["chosen_strength"] == best
    assert json.loads((out / "L2-SP.json").read_text())["strengths"] == [0.01, 100.0]
    trainer = demo_llm.lora_trainer(task, cfg, tmp_path / "apart")
    trainer.train()
    apart = demo_llm.evaluate_losses(trainer, task.evals, "apart")
    plain = next(r for r in table if r[0] == "plain")
    assert [float(x) for x in plain[2:5]] == pytest.approx([apart[s] for s in bs.LLM_EVALS], abs=1e-4)


def test_llm_task_refuses_methods_it_does_not_run(capsys):
    from benchmarks import strength as bs

    with pytest.raises(SystemExit) as e:
        bs.main(["--task", "llm", "--methods", "plain", "LP-FT", "--no-write"])
    assert e.value.code == 2 and "LP-FT" in capsys.readouterr().err


def test_llm_budget_is_recorded_in_the_section_and_refused_off_the_llm_task(tmp_path, capsys):
    """``--budget ε``: the JSON's budget choice is the row marked "under the budget", the text states the
    rule with the start model's retained loss; on a task without a retained set it is refused."""
    from torch import nn

    from benchmarks import strength as bs
    from robustft.analysis.strength import strength_sweep

    table = {"start": (0.0, 1.0), 0.01: (0.5, 1.6), 1.0: (0.7, 1.05)}  # strength -> (id loss, retained loss)

    class Fake:
        def __init__(self, callbacks):
            self.model, self.s, self.trained = nn.Linear(1, 1), callbacks[0].s, False

        def train(self):
            self.trained = True

        def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
            row = table[self.s if self.trained else "start"]
            return {f"{metric_key_prefix}_loss": row[0] if eval_dataset != "retained" else row[1]}

    class Strength:
        def __init__(self, s):
            self.s = s

        def on_train_begin(self, *a, **k):
            pass

    curve = strength_sweep(Fake, Strength, [0.01, 1.0], {d: d for d in bs.LLM_EVALS}, "id", metric="loss",
                           greater_is_better=False, name="L2-SP",
                           budget={"dataset": "retained", "epsilon": 0.1})
    data = curve.as_dict()
    data.update(meaning="λ", seconds=1.0, load=0.0, description="fake")
    (tmp_path / "L2-SP.json").write_text(json.dumps(data))
    text = bs.section("llm", tmp_path, "cmd --budget 0.1", per_method=False)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")]
    marked = {r[1]: r[-1] for r in rows[1:]}
    assert marked == {"0.01": "", "1": "chosen on id under the budget"}  # 0.01 has the lower id loss
    assert "at most the base model's (1.0000) + 0.1 compete" in text
    with pytest.raises(SystemExit) as e:
        bs.main(["--task", "topics", "--budget", "0.1", "--no-write"])
    assert e.value.code == 2 and "--budget: only with --task llm" in capsys.readouterr().err
