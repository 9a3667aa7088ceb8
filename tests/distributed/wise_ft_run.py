"""Launched by tests/distributed/test_wise_ft.py with torchrun (2 CPU ranks, gloo, DDP).

A WiSE-FT sweep through the Trainer's distributed evaluation; alpha=1 is applied so the model ends
at the fine-tuned weights, from which the test's brute-force curve is computed. Writes
OUT/rank<R>.json (curve as seen by that rank, and the brute-force curve on rank 0).
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.getcwd())
from robustft import WiseFTCallback  # noqa: E402
from tests.distributed.harness import finish  # noqa: E402
from tests.tiny import tiny_bert  # noqa: E402


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": torch.randn(n, generator=g).tolist()})


def mse(pred):
    p = torch.as_tensor(pred.predictions).reshape(-1)
    return {"mse": torch.mean((p - torch.as_tensor(pred.label_ids).reshape(-1)) ** 2).item()}


def main(out: str) -> None:
    model = tiny_bert(0, num_labels=1, hidden=32, dropout=0.0)
    model.config.problem_type = "regression"
    evals = {"id": data(32, 5), "shifted": data(32, 6)}
    cb = WiseFTCallback(
        alpha=1.0,
        alphas=[0.0, 0.5, 1.0],
        eval_datasets=evals,
        id_dataset="id",
        metric="mse",
        greater_is_better=False,
        progress=False,
    )
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data(32, 1), compute_metrics=mse, callbacks=[cb])
    trainer.train()
    rank = int(os.environ["RANK"])
    info = {"world_size": trainer.args.world_size, "curve": cb.curve.as_dict()}
    if rank == 0:  # brute force: plain torch over the full eval sets, from the start snapshot and the end
        start = dict(zip(cb.weights.start.names, cb.weights.start.tensors, strict=True))
        end = {n: p.detach().clone() for n, p in model.named_parameters()}
        brute = {}
        model.eval()
        for name, ds in evals.items():
            brute[name] = []
            for a in cb.curve.alphas:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_((1 - a) * start[n] + a * end[n])
                    pred = model(input_ids=torch.tensor(ds["input_ids"])).logits.reshape(-1)
                brute[name].append(torch.mean((pred - torch.tensor(ds["labels"])) ** 2).item())
        info["brute"] = brute
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    finish()

if __name__ == "__main__":
    main(sys.argv[1])
