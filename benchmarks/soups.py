"""Model soups on the demo tasks: greedy soup vs uniform soup vs the best single model vs WiSE-FT α*.

    python benchmarks/soups.py                     # both tasks (topics, glosses); writes the docs
    python benchmarks/soups.py --task glosses --k 3 --no-write

K models are fine-tuned from the same zero-shot start (``robustft demo``'s all-MiniLM-L6-v2 start, 400
training examples, batch 32) with different seeds, learning rates and epochs (``SWEEP``, a small version of
the paper's hyperparameter sweep). Then, with one live model and the K fine-tuned state dicts in memory
(``robustft.interpolation.soup.soup_model``): every model is scored alone, the greedy soup is built in
decreasing order of ``id`` accuracy (Wortsman et al. 2022, Alg. 1), and the uniform soup of all K is scored;
the best single model is the one with the best ``id`` accuracy, and WiSE-FT α* interpolates from the zero-shot
start to it with α chosen on ``id`` (grid 0, 0.1, ..., 1). Only ``id`` chooses; ``id_test`` (held-out
in-distribution) and ``shifted`` are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.llm import write_section  # noqa: E402
from benchmarks.robustness import demo_task, make_trainer  # noqa: E402

REPORTED = ("id_test", "shifted")
MARKERS = {
    task: (f"<!-- soups-{task}:start -->", f"<!-- soups-{task}:end -->") for task in ("topics", "glosses")
}
DOCS = ("benchmarks.md", "averaging.md")


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning run of the sweep."""

    seed: int
    learning_rate: float
    epochs: float

    @property
    def name(self) -> str:
        return f"s{self.seed} lr{self.learning_rate:g} ep{self.epochs:g}"


#: the hyperparameter sweep (the first K are used)
SWEEP = (Recipe(0, 5e-5, 1), Recipe(1, 1e-4, 1), Recipe(2, 3e-5, 2), Recipe(3, 5e-5, 2), Recipe(4, 2e-5, 2))


def fine_tune(task, recipe: Recipe, out: Path) -> tuple[dict, float]:
    """A state dict (CPU copy) of the start fine-tuned with ``recipe``, and the wall time it took."""
    from transformers import Trainer

    from robustft.demos import encoder as demo

    model = task.start()
    args = demo.training_arguments(out, recipe.seed, recipe.epochs, recipe.learning_rate, progress=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task.train,
        data_collator=task.collator,
        compute_metrics=task.metrics,
    )
    t0 = time.perf_counter()
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, time.perf_counter() - t0


def measure(task_name: str, k: int, seed: int, out: Path, n_eval: int, alphas: list[float],
            n_train: int = 400) -> str:
    """The section of one task: the table of the four rows and how it was made."""
    from robustft.interpolation.soup import SoupIngredients, soup_model, trainer_scorer
    from robustft.interpolation.wise_ft import WiseFTWeights, wise_ft_sweep

    task = demo_task(seed, task=task_name, n_train=n_train, n_eval=n_eval)
    recipes = SWEEP[:k]
    trained, train_seconds = [], []
    for i, recipe in enumerate(recipes):
        state, seconds = fine_tune(task, recipe, out / f"ft{i}")
        trained.append(state)
        train_seconds.append(seconds)
        print(f"[{task_name}] fine-tuned {recipe.name} in {seconds:.0f} s", flush=True)
    live = task.start()
    trainer = make_trainer(task, live, out / "soup")
    names = [r.name for r in recipes]
    ingredients = SoupIngredients(live, trained, names)  # read once; every soup below is written into `live`

    def reported() -> dict[str, float]:
        return {s: trainer.evaluate(task.evals[s], metric_key_prefix=s)[f"{s}_accuracy"] for s in REPORTED}

    t0 = time.perf_counter()  # the choice sees "id" only; the reported sets are scored for the rows below
    greedy = soup_model(
        live,
        ingredients,
        trainer_scorer(trainer, {"id": task.evals["id"]}, "accuracy"),
        "greedy",
        metric="accuracy",
        progress=False,
    )
    soup_seconds = time.perf_counter() - t0
    rows_scores = {"greedy": {**greedy.soup, **reported()}}
    ingredients.write_(list(range(k)))
    rows_scores["uniform"] = {**greedy.uniform, **reported()}
    best = greedy.order[0]
    ingredients.write_([names.index(best)])
    rows_scores["best"] = {**greedy.individual[best], **reported()}
    weights = WiseFTWeights.from_models(task.start(), live)
    curve = wise_ft_sweep(trainer, weights, {"id": task.evals["id"]}, "id", alphas=alphas, progress=False)
    rows_scores["wise"] = {"id": curve.value("id", curve.chosen_alpha), **reported()}  # the model is at θ(α*)
    rows = [
        (f"best single model ({best})", rows_scores["best"], "1 model"),
        (f"uniform soup (all {k})", rows_scores["uniform"], f"{k} models averaged"),
        (f"greedy soup ({len(greedy.kept)} kept)", rows_scores["greedy"], ", ".join(greedy.kept)),
        (
            f"WiSE-FT α*={curve.chosen_alpha:g} of the best single",
            rows_scores["wise"],
            "zero-shot start + 1 model",
        ),
    ]
    head = "| model | id (chooses) | id_test | shifted | ingredients |\n|---|---|---|---|---|"
    lines = [head] + [
        f"| {name} | {s['id']:.3f} | {s['id_test']:.3f} | {s['shifted']:.3f} | {note} |"
        for name, s, note in rows
    ]
    singles = "; ".join(f"{n}: {greedy.individual[n]['id']:.3f}" for n in greedy.order)
    command = (
        f"nice -n 5 python benchmarks/soups.py --task {task_name} --k {k} --seed {seed} --n-train {n_train} "
        f"--n-eval {n_eval} "
        f"--alphas {' '.join(f'{a:g}' for a in alphas)}"
    )
    description = task.description.replace(", 2 epochs of batch 32 at lr 5e-5", ", batch 32")
    return "\n".join(
        [
            f"Measured with `{command}` on the {description}; K={k} fine-tuned models "
            f"({', '.join(names)}: seed, learning rate, epochs; fine-tuning took {min(train_seconds):.0f}-"
            f"{max(train_seconds):.0f} s each). Machine: 2 CPU cores shared with about 8 other sessions "
            "(load "
            f"average 15 to 30 during the run). Accuracy on {n_eval} examples per set (one example is "
            f"{1 / n_eval:.4f}; differences below about {1 / n_eval**0.5:.2f} (two binomial standard errors "
            "at "
            f"50%) are within the noise); one run per task (n=1).",
            "",
            *lines,
            "",
            f"Single models' id accuracy (the greedy order): {singles}. The greedy soup took "
            f"{greedy.evaluations} evaluations of `id` in {soup_seconds:.0f} s (tensors read once, each soup "
            "written in place into one live model); α* is chosen on `id` over the grid "
            f"{', '.join(f'{a:g}' for a in alphas)}.",
        ]
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=list(MARKERS), help="task(s) (default: both)")
    p.add_argument("--k", type=int, default=4, help=f"fine-tuned models (at most {len(SWEEP)})")
    p.add_argument("--seed", type=int, default=0, help="the data seed of the task")
    p.add_argument("--n-train", type=int, default=400, help="training examples")
    p.add_argument("--n-eval", type=int, default=300, help="examples per eval set")
    p.add_argument(
        "--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], help="the WiSE-FT grid"
    )
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_soups_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = p.parse_args(argv)
    if not 1 <= args.k <= len(SWEEP):
        p.error(f"--k must be in 1..{len(SWEEP)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for task_name in args.task or list(MARKERS):
        text = measure(task_name, args.k, args.seed, Path(args.out) / task_name, args.n_eval, args.alphas,
                       args.n_train)
        print(text, flush=True)
        if not args.no_write:
            for doc in DOCS:
                write_section(text, ROOT / "docs" / doc, *MARKERS[task_name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
