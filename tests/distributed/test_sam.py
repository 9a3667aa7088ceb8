"""SAM and random weight perturbation under a 2-process CPU launch (torchrun, gloo, DDP)."""

import pytest
import torch
from safetensors.torch import load_file

from tests.callbacks.sam_helpers import ToyData, reference_sam, tiny_bert
from tests.distributed.harness import torchrun

RHO, CLIP = 0.05, 0.05  # as tests/distributed/sam_run.py runs them


@pytest.mark.slow
def test_sam_and_random_perturbation_under_ddp(tmp_path):
    """2 processes (torchrun, gloo): ε from the synchronized gradient keeps the ranks identical, and
    SAM equals the single-process reference on the whole batch."""
    torchrun("tests/distributed/sam_run.py", str(tmp_path))
    ref = tiny_bert()
    reference_sam(ref, ToyData().batch(), 3, RHO, False, 0.0, CLIP, 0.1, 0.9)
    for variant in ("sam", "rwp"):
        r0 = load_file(tmp_path / f"{variant}-rank0.safetensors")
        r1 = load_file(tmp_path / f"{variant}-rank1.safetensors")
        for n in r0:
            assert torch.equal(r0[n], r1[n]), (variant, n)  # ranks never drift apart
    sam = load_file(tmp_path / "sam-rank0.safetensors")
    diff = max((sam[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
    assert diff < 1e-6
