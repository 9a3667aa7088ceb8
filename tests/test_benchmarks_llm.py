"""benchmarks/llm.py's throughput part on a tiny random Llama: packed rows against the conversations
tokenized by hand, one run of every variant, and the command end to end (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llm as bench
from robustft.demos import llm as demo_llm
from tests.tiny import tiny_llama_folder

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["</s>", "[UNK]", "[PAD]", "user", "assistant", ":", "a", "the", "of", "bird", "tree", "Define",
         "word"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "model", WORDS, TEMPLATE)


def test_packed_rows_are_the_conversations_concatenated_and_cut(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [demo_llm.definition_example("heron", "a bird"), demo_llm.definition_example("oak", "a tree of")]
    stream = []
    for row in rows:  # by hand: the template's text, split on spaces, looked up in the vocabulary
        for m in row["prompt"] + row["completion"]:
            text = f"{m['role']} : {m['content']} </s>"
            stream += [WORDS.index(w) if w in WORDS else WORDS.index("[UNK]")
                       for w in text.replace('"', ' " ').replace(".", " . ").split()]
    got = bench.packed_rows(rows, tok, seq_len=5, n_rows=7)
    assert [len(r["input_ids"]) for r in got] == [5] * 7
    flat = [i for r in got for i in r["input_ids"]]
    assert flat == (stream * 3)[:35]  # cycled when the text is shorter than the rows asked for


@pytest.mark.parametrize("variant", bench.THROUGHPUT_VARIANTS)
def test_one_run_of_each_variant_trains_on_full_rows_and_reports_its_peak(tiny_model, tmp_path, variant):
    from dataclasses import asdict

    cfg = demo_llm.LLMDemoConfig(n_train=8, steps=3)
    spec = {"cfg": asdict(cfg), "shape": asdict(bench.Shape(seq_len=16, batch_size=2, grad_accum=2)),
            "model": str(tiny_model), "device": "cpu", "bf16": False, "threads": 1, "variant": variant,
            "out": str(tmp_path / "out")}
    got = bench.run_one(json.loads(json.dumps(spec)))  # the spec travels as JSON to the child process
    assert got["tokens"] == 16 * 2 * 2  # every token of every micro-batch counted: no padding
    assert len(got["steps"]) == 2 and all(s > 0 for s in got["steps"])
    assert got["peak_mb"] > 0


def test_the_table_gives_ratios_targets_and_extra_memory():
    per = {"plain LoRA": {"tokens_per_s": [100.0, 80.0], "ratio": [1.0, 1.0], "peak_mb": [500.0, 520.0],
                          "extra_mb": [0.0, 0.0]},
           "Flat-LoRA": {"tokens_per_s": [90.0, 70.0], "ratio": [100 / 90, 80 / 70],
                         "peak_mb": [530.0, 540.0], "extra_mb": [30.0, 20.0]}}
    table = bench.throughput_table(per)
    flat = next(line for line in table.splitlines() if line.startswith("| Flat-LoRA"))
    assert "1.127x" in flat and "1.111-1.143x" in flat and "<= 1.10x" in flat and "+25" in flat
    assert "510 (peak)" in table


def test_throughput_refuses_variants_without_the_reference():
    with pytest.raises(ValueError, match="plain LoRA"):
        bench.throughput(demo_llm.FAST, 1, variants=("EMA",))


@pytest.mark.slow
def test_the_command_runs_every_variant_in_its_own_process(tiny_model):
    proc = subprocess.run(
        [sys.executable, "benchmarks/llm.py", "--model", str(tiny_model), "--skip-scores", "--no-write",
         "--rounds", "1", "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--threads", "1",
         "--variants", "EMA", "Flat-LoRA", "EWC"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for v in ("plain LoRA", "EMA", "Flat-LoRA", "EWC"):
        assert f"| {v}" in proc.stdout
    assert "32 tokens per optimizer step" in proc.stdout and "MiB" in proc.stdout
