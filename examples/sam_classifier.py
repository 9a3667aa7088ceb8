"""Fine-tune a small text classifier with SAM (or a one-pass relative) inside an unchanged HF Trainer.

Offline and CPU-only: a tiny BERT is built from a config, saved to a temporary folder and loaded
back with ``from_pretrained`` (as a real checkpoint would be); the task is synthetic (the label is
the first token modulo 3). Usage:

    python examples/sam_classifier.py --variant sam          # exact SAM (2 passes per step)
    python examples/sam_classifier.py --variant asam         # adaptive SAM
    python examples/sam_classifier.py --variant rwp --lora   # Flat-LoRA: random perturbation of W0 + sBA
    python examples/sam_classifier.py --variant mgpo --lora  # LoRA-MGPO: momentum-guided, per LoRA layer
    python examples/sam_classifier.py --variant msam
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from robustft import MGPOCallback, MomentumSAMCallback, RandomPerturbationCallback, SAMCallback

VARIANTS = {
    "sam": lambda: SAMCallback(rho=0.05),
    "asam": lambda: SAMCallback(rho=0.5, adaptive=True),
    "msam": lambda: MomentumSAMCallback(rho=0.3),
    "rwp": lambda: RandomPerturbationCallback(rho=0.05),
    "mgpo": lambda: MGPOCallback(rho=0.05),
    "none": None,
}


class FirstTokenTask(torch.utils.data.Dataset):
    def __init__(self, n: int, vocab: int = 64, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sam")
    parser.add_argument(
        "--lora", action="store_true", help="train a PEFT LoRA adapter instead of all weights"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=3,
        )
        BertForSequenceClassification(config).save_pretrained(f"{tmp}/base")
        model = BertForSequenceClassification.from_pretrained(f"{tmp}/base")
        if args.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
            )

        factory = VARIANTS[args.variant]
        callbacks = [factory()] if factory else []
        training_args = TrainingArguments(
            output_dir=f"{tmp}/out",
            per_device_train_batch_size=16,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=args.steps,
            learning_rate=3e-3,
            max_grad_norm=1.0,
            logging_steps=10,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=training_args, train_dataset=FirstTokenTask(256), callbacks=callbacks
        )
        trainer.train()
        metrics = trainer.evaluate(FirstTokenTask(128, seed=1))
    logged = {k: v for h in trainer.state.log_history for k, v in h.items() if "/" in k}
    result = {"variant": args.variant, "lora": args.lora, "eval_loss": metrics["eval_loss"], **logged}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
