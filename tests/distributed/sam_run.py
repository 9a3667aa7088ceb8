"""Launched by test_sam.py with torchrun (2 CPU processes, gloo): SAM and RWP under DDP.

Each rank writes its final parameters to <out>/<variant>-rank<r>.safetensors.
"""

import sys

import torch
from safetensors.torch import save_file

from robustft import RandomPerturbationCallback, SAMCallback
from tests.callbacks.sam_helpers import make_trainer, tiny_bert
from tests.distributed.harness import finish

out = sys.argv[1]
torch.set_num_threads(1)
for variant, factory in (
    ("sam", lambda: SAMCallback(rho=0.05)),
    ("rwp", lambda: RandomPerturbationCallback(0.05)),
):
    model = tiny_bert()
    # per-device batch 8 on 2 ranks = the 16-sample batch of the single-process reference
    trainer = make_trainer(model, f"{out}/{variant}", [factory()], total_batch=8, max_grad_norm=0.05)
    trainer.train()
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    rank = trainer.accelerator.process_index
    save_file(
        {n: p.detach().contiguous() for n, p in model.named_parameters()},
        f"{out}/{variant}-rank{rank}.safetensors",
    )
finish()
