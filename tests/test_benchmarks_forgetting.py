"""benchmarks/forgetting.py on a tiny Llama: the finish counts equal one generation per limit, the report and
the ForgettingCallback timings come from runs that really scored, and the section holds them."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow  # a retention set, 2 report runs and 9 evaluations on a tiny model (~10-20 s loaded)
def test_tiny_run_measures_every_part(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks import forgetting as bf
    from robustft.analysis import report, retention
    from tests.analysis.retention_helpers import ID_ROWS, PROMPTS, SHIFT_ROWS, TEMPLATE, WORDS
    from tests.tiny import tiny_llama_folder

    model = tiny_llama_folder(tmp_path / "tiny", WORDS, TEMPLATE)
    tok = AutoTokenizer.from_pretrained(model)
    rows = [report.example_of(r) for r in ID_ROWS]
    shift = [report.example_of(r) for r in SHIFT_ROWS]
    limits = (2, 4, 6)
    res = bf.run(model, PROMPTS, rows, shift, rows, tok, tmp_path / "out", repeats=2, max_new_tokens=6,
                 limits=limits)
    lm = AutoModelForCausalLM.from_pretrained(model)
    end = retention.end_of_answer_id(tok, model)
    for n in limits:  # the reference: one greedy generation per limit
        want = sum(a is not None for a in retention.generate_answers(lm, tok, PROMPTS, n, end))
        assert res["counts"][n] == want, n
    saved = retention.RetentionSet.load(tmp_path / "out" / "retention.jsonl")
    assert res["gen"]["rows"] == len(saved.rows) == res["counts"][6] > 0
    assert res["gen"]["unfinished"] == len(PROMPTS) - len(saved.rows)
    rep = res["report"]
    assert len(rep["total"]) == len(rep["eval"]) == 2 and all(t > e > 0 for t, e in zip(rep["total"],
                                                                                     rep["eval"]))
    assert rep["n_items"] == {"id": len(rows), "shift": len(shift), "retained": len(saved.rows)}
    assert {k: len(v) for k, v in res["overhead"].items()} == {v: 2 for v in bf.VARIANTS}
    text = bf.section(res["gen"], res["counts"], len(PROMPTS), rep, res["overhead"], "cmd", (0.0, 0.0))
    for needle in ("`cmd`", "6 tokens:", "Retention set, built once", "`robustft report --adapter`",
                   "| loss+kl ", "ratio to without", f"{bf.per_token_ms(rep):.1f} ms per answer token and α"):
        assert needle in text, needle
    tokens = sum(rep["n_tokens"].values()) * rep["alphas"]
    # the median of two runs is their mean
    assert bf.per_token_ms(rep) == pytest.approx(1000 * (rep["eval"][0] + rep["eval"][1]) / 2 / tokens)


def test_skip_overhead_is_refused_when_the_section_would_be_written():
    from benchmarks import forgetting as bf

    with pytest.raises(SystemExit):
        bf.main(["--skip-overhead"])
