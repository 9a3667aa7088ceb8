"""benchmarks/papers_train.py's summary: mean and range of each row and of its difference to plain."""

import sys
from pathlib import Path

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
