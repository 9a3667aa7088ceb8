"""BANG: fine-tune with label smoothing and/or mixup, then WiSE-FT (Lin et al., ICLR 2024).

"Spurious Feature Diversification Improves Out-of-distribution Generalization" (arXiv 2309.17230) finds that
WiSE-FT's gain under shift comes from mixing the start's and the fine-tuned model's (different) spurious
features, and that an over-confident fine-tuned model dominates the mix. BAlaNced averaGing (BANG) makes the
fine-tuned model less confident while it trains — label smoothing, mixup, or both — and then interpolates
as WiSE-FT does. Here on the demo task (real all-MiniLM-L6-v2, zero-shot start, a spurious source tag):

    python examples/bang_wise_ft.py --recipe both --out runs/bang        # label smoothing 0.1 + mixup
    python examples/bang_wise_ft.py --recipe plain --out runs/plain      # the plain WiSE-FT baseline

Label smoothing is the Trainer's own ``label_smoothing_factor``. Mixup needs the loss: text cannot be mixed
as pixels are, so :class:`MixupTrainer` mixes what the classifier head reads (the sentence embeddings,
"manifold mixup" at the head) of each example with another of the batch, h = λ·h_i + (1−λ)·h_j with
λ ~ Beta(a, a), and takes λ·CE(y_i) + (1−λ)·CE(y_j) (Zhang et al., 2018). ``WiseFTCallback`` then sweeps α on
the in-distribution split and leaves the model at θ(α*).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

from robustft import WiseFTCallback  # noqa: E402
from robustft.demos import encoder as demo  # noqa: E402
from robustft.ops.outputs import model_logits  # noqa: E402

RECIPES = ("plain", "smoothing", "mixup", "both")


class MixupTrainer(Trainer):
    """A Trainer whose loss is mixup of the head's inputs: the input of ``model.classifier`` (the sentence
    embedding of the demo's model; the pooled, dropped-out output of a BERT classifier) of each example mixed
    with a random other of the batch (a forward pre-hook, removed on every exit); λ ~ Beta(a, a) per
    batch from a seeded generator (so a run is reproducible). Label smoothing, if set, applies to both
    cross-entropies. Evaluation (the model in eval mode) uses the Trainer's own loss and logits."""

    def __init__(self, *args, mixup_alpha: float = 0.4, mixup_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if not mixup_alpha > 0:
            raise ValueError(f"mixup_alpha: expected a number > 0, got {mixup_alpha!r}")
        self.mixup_alpha = float(mixup_alpha)
        self.rng = np.random.default_rng(mixup_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation and the α sweep score the model as it is
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
        perm = torch.as_tensor(self.rng.permutation(labels.shape[0]), device=labels.device)

        def mix(module, args):  # the head's input h -> λ·h + (1−λ)·h[perm]
            return (lam * args[0] + (1 - lam) * args[0][perm], *args[1:])

        handle = model.classifier.register_forward_pre_hook(mix)
        try:
            logits = model_logits(model(**{k: v for k, v in inputs.items() if k != "labels"}))
        finally:
            handle.remove()
        smoothing = self.args.label_smoothing_factor
        ce = torch.nn.functional.cross_entropy
        loss = lam * ce(logits, labels, label_smoothing=smoothing) + (1 - lam) * ce(
            logits, labels[perm], label_smoothing=smoothing)
        return (loss, {"logits": logits}) if return_outputs else loss


def run(recipe: str, out: str | os.PathLike, seed: int = 0, n_train: int = 400, n_eval: int = 300,
        epochs: float = 2.0, smoothing: float = 0.1, mixup_alpha: float = 0.4,
        alphas: tuple[float, ...] = tuple(i / 10 for i in range(11))) -> dict:
    """Fine-tune the demo's zero-shot start with ``recipe``, WiSE-FT at α* chosen on "id"; the scores."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    model, tokenizer = demo.zero_shot_start(seed)
    train, evals = demo.encode_splits(tokenizer, seed, n_train, n_eval)
    wise = WiseFTCallback(eval_datasets=evals, id_dataset="id", alphas=list(alphas), progress=False)
    smooth = smoothing if recipe in ("smoothing", "both") else 0.0
    args = demo.training_arguments(out, seed, epochs, progress=False, label_smoothing_factor=smooth)
    kwargs = dict(model=model, args=args, train_dataset=train, compute_metrics=demo.accuracy,
                  callbacks=[wise], data_collator=DataCollatorWithPadding(tokenizer))
    if recipe in ("mixup", "both"):
        trainer = MixupTrainer(**kwargs, mixup_alpha=mixup_alpha, mixup_seed=seed)
    else:
        trainer = Trainer(**kwargs)
    trainer.train()  # ends at θ(α*)
    curve = wise.curve
    a = curve.chosen_alpha
    result = {
        "recipe": recipe, "label_smoothing": smooth, "seed": seed, "chosen_alpha": a,
        "mixup_alpha": mixup_alpha if recipe in ("mixup", "both") else None,
        "at_alpha": {s: curve.value(s, a) for s in ("id", "id_test", "shifted")},
        "finetuned": {s: curve.value(s, 1.0) for s in ("id", "id_test", "shifted")},
        "zero_shot": {s: curve.value(s, 0.0) for s in ("id", "id_test", "shifted")},
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bang.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=RECIPES, default="both")
    parser.add_argument("--out", default="runs/bang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=400)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing factor")
    parser.add_argument("--mixup-alpha", type=float, default=0.4, help="a of λ ~ Beta(a, a)")
    args = parser.parse_args()
    r = run(args.recipe, args.out, args.seed, args.train_size, args.eval_size, args.epochs, args.smoothing,
            args.mixup_alpha)
    pct = {k: {s: f"{100 * v:.1f}%" for s, v in r[k].items()}
           for k in ("zero_shot", "finetuned", "at_alpha")}
    print(f"recipe {r['recipe']}: zero-shot {pct['zero_shot']}; fine-tuned {pct['finetuned']}; "
          f"WiSE-FT at α*={r['chosen_alpha']:g} (chosen on id) {pct['at_alpha']}")
    print(f"curve and plot in {args.out}/wise_ft.(json|csv|png), scores in {args.out}/bang.json")


if __name__ == "__main__":
    main()
