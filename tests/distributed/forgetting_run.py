"""Launched by tests/distributed/test_forgetting.py: a PEFT LoRA Llama trained with ForgettingCallback on 1
rank or 2 DDP ranks (gloo), evaluated every 2 steps.

argv: OUT. The global batch is the whole 8-sample dataset in both modes, so both take the same steps; the 5
retained rows split unevenly over 2 ranks. Rank R writes OUT/rank<R>.json: the mode that ran and every logged
``eval_retained_*`` value by step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

sys.path.insert(0, os.getcwd())
from robustft import ForgettingCallback  # noqa: E402
from tests.callbacks.trl_helpers import WORDS, save_tiny_llama  # noqa: E402
from tests.distributed.harness import finish  # noqa: E402
from tests.tiny import lm_dataset, training_args  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 4
RETAINED = [{"prompt": "the cat", "completion": " sat on the mat"}, {"prompt": "a dog", "completion": " ran"},
            {"prompt": "the rug", "completion": " is red and blue"}, {"prompt": "a mat", "completion": " is"},
            {"prompt": "a red dog", "completion": " ran fast on a rug"}]


def main(out: str) -> None:
    from peft import LoraConfig, get_peft_model

    rank = int(os.environ.get("RANK", "0"))  # the process group starts with the Trainer, later
    world = int(os.environ.get("WORLD_SIZE", "1"))
    path = save_tiny_llama(Path(out) / f"base{rank}")  # the same seeded weights on every rank
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora)
    data = lm_dataset(GLOBAL_BATCH, seq_len=6).map(
        lambda r: {"input_ids": [i % len(WORDS) for i in r["input_ids"]],
                   "labels": [i % len(WORDS) for i in r["labels"]]})
    args = training_args(Path(out) / "run", max_steps=STEPS, learning_rate=0.05, eval_strategy="steps",
                         eval_steps=2, per_device_train_batch_size=GLOBAL_BATCH // world,
                         per_device_eval_batch_size=GLOBAL_BATCH // world)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      callbacks=[ForgettingCallback(RETAINED, tokenizer=AutoTokenizer.from_pretrained(path),
                                                    batch_size=2)])
    trainer.train()
    logs = {str(e["step"]): {k: e[k] for k in e if k.startswith("eval_retained")}
            for e in trainer.state.log_history if "eval_retained_loss" in e}
    mode = {"wrapper": type(trainer.model_wrapped).__name__, "world_size": trainer.args.world_size}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"mode": mode, "logs": logs}))
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
