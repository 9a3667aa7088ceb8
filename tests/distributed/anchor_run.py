"""Launched by tests/distributed/test_anchor.py: each anchor penalty trained on 1 rank or 2 DDP ranks (gloo).

argv: MODE OUT. The global batch is the whole 8-sample dataset in both modes (halved again with 2 accumulated
micro-batches for ``<case>_ga2``), so both take the same steps. Rank R writes OUT/<case>/rank<R>.safetensors
(final trainable weights); the penalty must reach each step's gradient once whatever the number of ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer

sys.path.insert(0, os.getcwd())
from robustft import EWCCallback, L2SPCallback, SpectralRegCallback  # noqa: E402
from tests.distributed.harness import finish  # noqa: E402
from tests.tiny import lm_dataset, tiny_llama, training_args  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 4


def _fisher_batches():
    ids = torch.tensor(lm_dataset(4, seed=3)["input_ids"])
    return [{"input_ids": ids, "labels": ids}]


CASES = {
    "plain": lambda: [],
    "l2sp": lambda: [L2SPCallback(50.0)],
    "l2sp_decoupled": lambda: [L2SPCallback(50.0, decoupled=True)],
    "ewc": lambda: [EWCCallback(500.0, fisher_data=_fisher_batches())],
    "spectral": lambda: [SpectralRegCallback(5.0, target="one")],
}


def run_case(name: str, out: Path) -> None:
    base = name.removesuffix("_ga2")
    accumulation = 2 if name.endswith("_ga2") else 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args(out / name, max_steps=STEPS, learning_rate=0.05,
                         per_device_train_batch_size=GLOBAL_BATCH // world // accumulation,
                         gradient_accumulation_steps=accumulation)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(GLOBAL_BATCH),
                      callbacks=CASES[base]())
    trainer.train()
    tensors = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rank = dist.get_rank() if dist.is_initialized() else 0
    # the mode that really ran: the Trainer's wrapper and the number of processes it trained with
    mode = {"wrapper": type(trainer.model_wrapped).__name__, "world_size": str(trainer.args.world_size)}
    save_file(tensors, str(out / name / f"rank{rank}.safetensors"), metadata=mode)


def main(out: str) -> None:
    for name in [*CASES, *(f"{c}_ga2" for c in CASES if c != "plain")]:
        run_case(name, Path(out))
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
