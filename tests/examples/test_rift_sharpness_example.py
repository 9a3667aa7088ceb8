"""examples/rift_sharpness.py runs RiFT and writes the WiSE-FT path's sharpness report (real encoder)."""

import json

import pytest

from tests.examples import run_example


@pytest.mark.slow
def test_rift_sharpness_example_runs(tmp_path):
    out = run_example("rift_sharpness.py", "--out", str(tmp_path), "--train-size", "64", "--eval-size", "32",
                      "--probe-size", "8", "--steps", "1", timeout=1800)
    assert "least critical module: " in out and "RiFT chosen alpha" in out
    report = json.loads((tmp_path / "sharpness.json").read_text())
    assert report["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(report["layers"]) == 8
    assert all(len(v) == 5 and min(v) >= 0 for v in report["sharpness"].values())
