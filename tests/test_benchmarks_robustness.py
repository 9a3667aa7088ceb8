"""benchmarks/robustness.py's machinery on a tiny model: every row of every table, and the docs sections."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny import tiny_task  # noqa: E402


@pytest.mark.slow
def test_every_table_has_every_row_and_the_docs_get_each_section(tmp_path):
    from benchmarks import robustness as rb

    sections = rb.build_sections(tiny_task(), tmp_path, list(rb.MARKERS), rounds=1, steps=3, command="cmd")
    assert set(sections) == set(rb.MARKERS)
    for name, variants in (("interpolation", rb.INTERPOLATION), ("regularizers", rb.REGULARIZERS),
                           ("overhead", rb.OVERHEAD_VARIANTS)):
        rows = [line.split("|")[1].strip() for line in sections[name].splitlines() if line.startswith("| ")]
        assert rows[1:] == list(variants), name  # the header, then one row per variant in order
        assert "`cmd`" in sections[name]
        assert "nan" not in sections[name], sections[name]  # every cost was measured
    docs = tmp_path / "docs"
    docs.mkdir()
    for doc in ("benchmarks.md", "dynamic_interpolation.md", "regularizers.md"):
        (docs / doc).write_text("# page\n")
    rb.write_docs(sections, docs)
    rb.write_docs(sections, docs)  # a rerun replaces its sections, never appends them twice
    bench = (docs / "benchmarks.md").read_text()
    assert all(bench.count(start) == 1 and bench.count(end) == 1 for start, end in rb.MARKERS.values())
    assert sections["interpolation"] in (docs / "dynamic_interpolation.md").read_text()
    assert sections["regularizers"] in (docs / "regularizers.md").read_text()
    glosses = {name: text.replace("`cmd`", "`cmd --task glosses`") for name, text in sections.items()}
    rb.write_docs(glosses, docs, task="glosses")  # the second task's tables beside, never over, the first's
    bench = (docs / "benchmarks.md").read_text()
    assert sections["regularizers"] in bench and glosses["regularizers"] in bench
    assert bench.count("<!-- robustness-regularizers-glosses:start -->") == 1


def test_reading_reports_each_method_against_the_reference_and_names_only_real_gains():
    from benchmarks.robustness import Row, reading

    rows = {"ref": Row({"id_test": 0.80, "shifted": 0.50}),
            "gains under shift": Row({"id_test": 0.795, "shifted": 0.60}),  # -0.5 / +10 points
            "loses in distribution": Row({"id_test": 0.70, "shifted": 0.70}),  # -10 / +20 points
            "worse": Row({"id_test": 0.80, "shifted": 0.40})}
    text = reading(rows, "ref")
    assert "gains under shift -0.5 / +10.0" in text and "worse +0.0 / -10.0" in text
    assert text.endswith("at most 1 point lower in distribution: gains under shift.")
    none = reading({"ref": rows["ref"], "worse": rows["worse"]}, "ref")
    assert none.endswith("No method beats it under shift without losing over 1 point in distribution.")


@pytest.mark.slow
def test_llm_table_has_every_row_on_a_tiny_llama_with_the_demo_tokenizer(tmp_path):
    """``--llm``'s rows through demo_llm's trainer and scores, on a tiny Llama (the demo's tokenizer and
    chat rows): every method scored on every set, WEMoE left out with its reason, every cost measured."""
    import math

    from benchmarks import robustness as rb
    from robustft.demos import llm as demo_llm
    from tests.tiny import tiny_llm_task

    task = tiny_llm_task(tmp_path / "model", rb.LLM_SPLITS)
    if task is None:
        pytest.skip("the LLM demo's model is not in the cache (robustft demo --llm sets it up)")
    cfg = demo_llm.LLMDemoConfig(n_train=8, n_eval=4, steps=2, batch_size=4, rank=2)
    table_rows, description, n = rb.llm_rows(cfg, tmp_path / "out", task)
    assert "WEMoE" in table_rows and "not run" in table_rows["WEMoE"].note
    for name, r in table_rows.items():
        if name != "WEMoE":
            assert all(math.isfinite(r.scores[s]) for s in rb.LLM_SPLITS), name
            assert math.isfinite(r.eval_seconds) and math.isfinite(r.train_seconds), name
    table = rb.llm_table(table_rows, n)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == list(table_rows)
    assert "nan" not in table
