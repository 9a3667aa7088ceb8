"""examples/sam_classifier.py runs as it is (offline, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "metric"),
    [(["--variant", "sam"], "sam/sharpness"), (["--variant", "rwp", "--lora"], "rwp/perturbation_norm")],
)
def test_sam_example_runs(argv, metric):
    out = subprocess.run(
        [sys.executable, "examples/sam_classifier.py", *argv, "--steps", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert metric in result and result["eval_loss"] > 0
