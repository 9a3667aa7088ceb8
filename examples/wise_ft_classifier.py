"""WiSE-FT on your own Trainer: zero-shot start, fine-tune, sweep α on in-distribution data.

Runs offline on CPU in well under a minute (real all-MiniLM-L6-v2 encoder, small generated task):

    python examples/wise_ft_classifier.py --out runs/example
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from robustft import SentenceClassifier, WiseFTCallback, install_zero_shot_head  # noqa: E402
from robustft.demos.encoder import LABELS, TOPICS, encoder_path, make_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/wise_ft_example")
    parser.add_argument("--train-size", type=int, default=192)
    parser.add_argument("--eval-size", type=int, default=96)
    args = parser.parse_args()

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = SentenceClassifier.from_pretrained(path, num_labels=len(LABELS))
    # the start point: a zero-shot classifier built from one description per label
    install_zero_shot_head(model, tokenizer, [TOPICS[label]["description"] for label in LABELS])

    def encode(data):
        ds = Dataset.from_dict(data).map(lambda b: tokenizer(b["text"], truncation=True), batched=True)
        return ds.rename_column("label", "labels").remove_columns(["text"])

    evals = {
        "id": encode(make_task(args.eval_size, 1)),
        "shifted": encode(make_task(args.eval_size, 2, True)),
    }
    wise = WiseFTCallback(eval_datasets=evals, id_dataset="id", alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            per_device_train_batch_size=32,
            num_train_epochs=2,
            learning_rate=5e-5,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=encode(make_task(args.train_size, 0)),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        callbacks=[wise],
    )
    trainer.train()  # ends with the model at θ(α*), α* chosen on "id"
    print(wise.curve.table())
    print(f"chosen alpha {wise.curve.chosen_alpha}; curve and plot in {args.out}/wise_ft.(json|csv|png)")


if __name__ == "__main__":
    main()
