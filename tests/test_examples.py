"""Every example runs as it is (offline, CPU, few steps), so none of them rots."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_ema_encoder_example(tmp_path):
    out = run_example("ema_encoder.py", "--steps", "4", "--output-dir", str(tmp_path))
    assert "EMA averaged" in out and "live" in out
    assert (tmp_path / "ema" / "config.json").is_file()
