"""benchmarks/papers_train.py's summary: mean and range of each row and of its difference to plain."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_summary_reports_mean_range_and_difference_to_plain():
    from benchmarks import papers_train as pt
    from benchmarks.robustness import Row

    def rows(plain, other, seconds):
        out = {name: Row({"id_test": other, "shifted": other}, train_seconds=seconds) for name in pt.ROWS}
        out[pt.ROWS[0]] = Row({"id_test": plain, "shifted": plain}, train_seconds=1.0)
        return out

    text = pt.summary([rows(0.90, 0.95, 2.0), rows(0.80, 0.80, 4.0)])
    lines = text.splitlines()
    assert len(lines) == 2 + len(pt.ROWS)
    assert lines[2].startswith("| plain fine-tuning | 85.0 (80.0-90.0) | 85.0 (80.0-90.0) | +0.0 (+0.0 to")
    assert lines[3] == ("| MGPO | 87.5 (80.0-95.0) | 87.5 (80.0-95.0) | +2.5 (+0.0 to +5.0) "
                        "| +2.5 (+0.0 to +5.0) | 3.00x |")


def test_rows_read_back_from_a_log_and_from_the_saved_files(tmp_path):
    import math

    from benchmarks import papers_train as pt
    from benchmarks.robustness import Row

    rows = {name: Row({"id_test": 0.5 + i / 10, "shifted": 0.4}, 1.0, 2.0 + i, note=f"x (y) {i}")
            for i, name in enumerate(pt.ROWS)}
    rows[pt.ROWS[0]] = Row({"id_test": 0.8, "shifted": 0.3})  # nan seconds
    log = tmp_path / "run.log"
    log.write_text("noise\n" + "\n".join(f"{n}: {r}" + (" (12 s)" if i % 2 else "")
                                         for i, (n, r) in enumerate(rows.items())))
    got = pt.from_log(log)
    assert set(got) == set(rows) and math.isnan(got[pt.ROWS[0]].train_seconds)
    assert all(got[n] == r for n, r in rows.items() if n != pt.ROWS[0])
    for name, row in got.items():
        pt.save(name, row, tmp_path / "seed0")
    back = pt.load(tmp_path / "seed0")[pt.ROWS[1]]
    assert (back.scores, back.train_seconds, back.note) == (rows[pt.ROWS[1]].scores, 3.0, "x (y) 1")
    (tmp_path / "seed0" / f"{pt.slug(pt.ROWS[2])}.json").unlink()
    with pytest.raises(SystemExit, match=pt.ROWS[2]):
        pt.load(tmp_path / "seed0")
