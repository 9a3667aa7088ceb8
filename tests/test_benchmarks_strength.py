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
