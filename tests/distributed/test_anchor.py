"""Anchor penalties under 2-rank DDP (CPU, gloo) equal one process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.distributed.harness import torchrun

CASES = ["l2sp", "l2sp_decoupled", "ewc", "spectral"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("anchor")
    for mode, nproc in (("single", 1), ("ddp", 2)):
        torchrun("tests/distributed/anchor_run.py", str(root / mode), nproc=nproc, timeout=400)
    return root


def _weights(root, mode, case, rank=0):
    return load_file(str(root / mode / case / f"rank{rank}.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES + [f"{c}_ga2" for c in CASES])
def test_ddp_equals_one_process(runs, case):
    single, plain = _weights(runs, "single", case), _weights(runs, "single", "plain")
    ddp0, ddp1 = _weights(runs, "ddp", case, 0), _weights(runs, "ddp", case, 1)
    assert any(not torch.allclose(single[n], plain[n], atol=1e-4) for n in single), "no effect of the penalty"
    for name, want in single.items():
        assert torch.equal(ddp0[name], ddp1[name]), name
        torch.testing.assert_close(ddp0[name], want, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_the_mode_that_ran(runs):
    """The 2-process launch really trained under DDP on 2 ranks; the reference launch on one process."""

    def mode(m, rank=0):
        with safe_open(str(runs / m / "l2sp" / f"rank{rank}.safetensors"), "pt") as f:
            return f.metadata()

    assert mode("single")["world_size"] == "1"
    for rank in (0, 1):
        assert mode("ddp", rank) == {"wrapper": "DistributedDataParallel", "world_size": "2"}
