"""Launching 1- and 2-rank CPU runs (gloo) from tests, and what the launched scripts share.

The FSDP2 and DeepSpeed patches here are TEST-ONLY (see shared/FACTS.md): without a GPU, accelerate silently
runs DDP when FSDP is asked for, and counts one process under DeepSpeed; the patches make the Trainer
really shard with FSDP2 / run DeepSpeed over the CPU ranks (gloo). The library carries no such patch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port: other test sessions may launch distributed runs at the same time."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_slow_marker() -> None:
    """Launching processes is for slow tests: the fast subset (``pytest -m "not slow"``) starts none."""
    if os.environ.get("ROBUSTFT_TEST_SLOW") == "0":  # set per test by tests/conftest.py
        test = os.environ.get("PYTEST_CURRENT_TEST", "this test").split(" ")[0]
        raise RuntimeError(f"{test} launches processes: mark it @pytest.mark.slow")


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None) -> str:
    """Run ``script`` under ``torch.distributed.run`` with ``nproc`` CPU ranks; returns its output."""
    require_slow_marker()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    # --standalone: torchrun picks a free rendezvous port itself (other test sessions may launch too)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / script), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def allow_fsdp_on_cpu() -> None:
    """TEST-ONLY patch: let accelerate run FSDP2 on MULTI_CPU instead of silently falling back to DDP."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # later AcceleratorState() calls (no plugin) re-run the device check: keep the plugin already set
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = patched
    # the mesh accelerate builds for MULTI_CPU has no dimension names; let fully_shard build its own
    Accelerator.torch_device_mesh = property(lambda self: None)


def allow_deepspeed_on_cpu() -> None:
    """TEST-ONLY patch: with no GPU, accelerate 1.15 gives DeepSpeed no backend and counts ONE process
    (``PartialState().num_processes == 1``) while DeepSpeed's engine spans every rank: each rank then
    reads the whole dataset (no distributed sampler) and ``trainer.evaluate`` fails in its gather.
    Make accelerate see the CPU ranks (gloo), as it does for plain DDP on CPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def patched(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if (kind == DistributedType.NO and not torch.cuda.is_available()
                and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                and int(os.environ.get("LOCAL_RANK", -1)) != -1):
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    PartialState._prepare_backend = patched


def fsdp_args() -> dict:
    """TrainingArguments for FSDP2 full sharding (with :func:`allow_fsdp_on_cpu` applied first)."""
    return dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank: a DTensor is gathered (a collective: call it on every rank)."""
    return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()


def full_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Gather ``local``, a shard laid out like the DTensor ``param`` (callback state), to a whole tensor."""
    if not hasattr(param, "placements"):
        return local
    from torch.distributed.tensor import DTensor

    mesh, placements = param.device_mesh, param.placements
    return DTensor.from_local(local, mesh, placements, shape=param.shape, stride=param.stride()).full_tensor()


def finish() -> None:
    """End a launched script: barrier, destroy the gloo group, and exit at once.

    A rank leaving while the other still works aborts at exit; and the interpreter's own teardown (C++
    destructors of gloo/DeepSpeed threads) sporadically ends in "terminate called without an active
    exception" (SIGABRT) after every file was written, and takes seconds. Everything is flushed and
    closed by then, so the process leaves with ``os._exit(0)``.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
