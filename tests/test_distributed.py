"""Averaging and WiSE-FT under 2-process CPU launches (gloo): DDP replicas and FSDP2 local shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, *args: str, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ema_and_wise_ft_under_two_ranks(tmp_path, mode):
    torchrun("tests/distributed/callbacks_run.py", mode, str(tmp_path))
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert all(i["world_size"] == 2 for i in infos)
    if mode == "fsdp":  # the mode that really ran: DTensor parameters, each rank holding half
        assert all(i["dtensor"] and i["wise_dtensor"] and i["fsdp_enabled"] for i in infos)
        assert all(i["local_numel"] * 2 == i["full_numel"] for i in infos)
    else:
        assert not any(i["dtensor"] for i in infos)
        assert all(i["local_numel"] == i["full_numel"] for i in infos)
    assert infos[0]["distance"] == pytest.approx(infos[1]["distance"], rel=1e-9)  # global norm on both ranks
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key  # ranks agree
        if key.startswith("ema."):
            brute = tensors[0]["brute." + key[len("ema."):]]
            torch.testing.assert_close(tensors[0][key], brute, atol=1e-6, rtol=1e-6)
        if key.startswith("wise."):
            reference = tensors[0]["wise_ref." + key[len("wise."):]]
            torch.testing.assert_close(tensors[0][key], reference, atol=1e-6, rtol=1e-6)
    assert any(k.startswith("wise.") for k in tensors[0])
