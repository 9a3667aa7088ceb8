"""examples/lora_arithmetic.py runs as it is, offline, and its outputs load with PEFT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lora_arithmetic_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "examples/lora_arithmetic.py", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "composite (composed) eval loss" in res.stdout
    assert (tmp_path / "run" / "composed" / "adapter_config.json").is_file()
    assert (tmp_path / "composed_r4" / "adapter_model.safetensors").is_file()
