"""examples/merge_models.py runs as shipped: fine-tunes three tiny Llamas, merges them with the example
recipe, and the merged model does better on average over the three tasks than any single fine-tune."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_merge_example_runs_and_merge_beats_single_finetunes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "merge_models.py"), "--workdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+\s+[\d.]+\s+[\d.]+)$", proc.stdout, flags=re.M))
    mean = {k: sum(map(float, v.split())) / 3 for k, v in rows.items()}
    assert set(mean) == {"base", "ft_stride1", "ft_stride2", "ft_stride3", "merged"}, proc.stdout
    assert mean["merged"] < min(mean[f"ft_stride{s}"] for s in (1, 2, 3)), mean
    assert (tmp_path / "merged" / "config.json").is_file()
