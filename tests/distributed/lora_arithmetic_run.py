"""Launched by tests/distributed/test_lora_arithmetic.py with torchrun (2 CPU ranks, gloo, DDP).

argv: BASE OTHER OUT. Trains a LoRA adapter with LoRAArithmeticCallback(evaluate=True); rank 0 saves
the trained adapter to OUT/trained; every rank writes what it saw to OUT/rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, os.getcwd())
from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback  # noqa: E402
from tests.distributed.harness import finish  # noqa: E402


def main() -> None:
    base, other, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(out / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    cb = LoRAArithmeticCallback({"self": 1.0, other: -0.5}, evaluate=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[cb])
    cb.attach(trainer)
    trainer.train()
    rank = dist.get_rank()
    if rank == 0:
        trainer.model.save_pretrained(out / "trained")
    info = {
        "world_size": dist.get_world_size(),
        "loss": cb.metrics["composed_loss"],
        "active": trainer.model.active_adapter,
        "adapters": sorted(trainer.model.peft_config),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    finish()


if __name__ == "__main__":
    main()
