"""RiFT and the layer-wise sharpness diagnostic on the demo task (real all-MiniLM-L6-v2 encoder, CPU).

1. RiFT: module robust criticality of every Linear/Embedding module on in-distribution examples; the least
   critical module is fine-tuned alone, then WiSE-FT picks α on the "id" split.
2. The diagnostic: a plain full fine-tune, then the per-block sharpness of θ(α) along its WiSE-FT path
   (``sharpness.{json,csv,png}``), to see which layers are sharp where interpolation loses accuracy.

    python examples/rift_sharpness.py --out runs/rift
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from robustft import (  # noqa: E402
    SentenceClassifier,
    WiseFTCallback,
    install_zero_shot_head,
    least_critical_module,
    sharpness_along_path,
)
from robustft.demos.encoder import LABELS, TOPICS, encoder_path, make_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rift_example")
    parser.add_argument("--train-size", type=int, default=192)
    parser.add_argument("--eval-size", type=int, default=96)
    parser.add_argument("--probe-size", type=int, default=32, help="examples measured on")
    parser.add_argument("--steps", type=int, default=3, help="projected ascent steps per module")
    args = parser.parse_args()

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    collate = DataCollatorWithPadding(tokenizer)

    def zero_shot():
        model = SentenceClassifier.from_pretrained(path, num_labels=len(LABELS))
        install_zero_shot_head(model, tokenizer, [TOPICS[label]["description"] for label in LABELS])
        return model

    def encode(data):
        ds = Dataset.from_dict(data).map(lambda b: tokenizer(b["text"], truncation=True), batched=True)
        return ds.rename_column("label", "labels").remove_columns(["text"])

    evals = {"id": encode(make_task(args.eval_size, 1)),
             "shifted": encode(make_task(args.eval_size, 2, True))}
    train = encode(make_task(args.train_size, 0))
    probe = collate([evals["id"][i] for i in range(min(args.probe_size, len(evals["id"])))])

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    def trainer(model, out, callbacks=()):
        return Trainer(
            model=model,
            args=TrainingArguments(output_dir=out, per_device_train_batch_size=32, num_train_epochs=2,
                                   learning_rate=5e-5, save_strategy="no", report_to=[], use_cpu=True,
                                   seed=0, disable_tqdm=True),
            train_dataset=train, data_collator=collate, callbacks=list(callbacks),
            compute_metrics=accuracy,
        )

    # 1. RiFT: the module whose worst-case perturbation (‖ΔW‖ ≤ 0.1‖W‖) raises the loss least, trained alone
    model = zero_shot()
    name = least_critical_module(model, probe, steps=args.steps)  # module_criticality(...) gives every MRC
    print(f"least critical module: {name}")
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(f"{name}."))
    wise = WiseFTCallback(eval_datasets=evals, id_dataset="id", alphas=[0.0, 0.25, 0.5, 0.75, 1.0])
    trainer(model, os.path.join(args.out, "rift"), [wise]).train()
    print(wise.curve.table())
    print(f"RiFT chosen alpha {wise.curve.chosen_alpha}")

    # 2. the diagnostic on a plain full fine-tune: per-block sharpness of θ(α) between start and fine-tuned
    start = {k: v.clone() for k, v in zero_shot().state_dict().items()}
    full = zero_shot()
    trainer(full, os.path.join(args.out, "full")).train()
    blocks = ["encoder.embeddings"] + [f"encoder.encoder.layer.{i}" for i in range(6)] + ["classifier"]
    report = sharpness_along_path(start, full, probe, alphas=[0.0, 0.25, 0.5, 0.75, 1.0], layers=blocks,
                                  rho=0.01, steps=args.steps)
    print(report.table())
    print(f"sharpest block per alpha: {report.sharpest()}")
    paths = report.save(args.out)
    print("report in " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
