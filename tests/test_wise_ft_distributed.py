"""WiSE-FT sweep under a 2-process CPU launch (gloo, DDP): the Trainer's distributed evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_uses_distributed_evaluation(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests/distributed/wise_ft_run.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["curve"]["results"] == r1["curve"]["results"]  # every rank sees the gathered metrics
    assert r0["curve"]["chosen_alpha"] == r1["curve"]["chosen_alpha"]
    for name, values in r0["brute"].items():  # metrics over the whole eval set, not a rank's half
        assert values == pytest.approx(r0["curve"]["results"][name], rel=1e-4, abs=1e-6), name
    assert json.loads((tmp_path / "wise_ft.json").read_text())["results"] == r0["curve"]["results"]
    assert not list(tmp_path.glob("*.tmp*"))
