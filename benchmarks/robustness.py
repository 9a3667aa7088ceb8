"""Robust fine-tuning methods side by side on the demo task: one table per issue, and per-step overheads.

    python benchmarks/robustness.py                         # all three sections; writes the docs
    python benchmarks/robustness.py --only interpolation    # issue 14's table only
    python benchmarks/robustness.py --no-write              # print only
    python benchmarks/robustness.py --llm                   # the LLM task's table (robustft demo --llm)

The task, data, seeds and training budget are those of ``robustft demo`` (``robustft.demos.encoder``: the
zero-shot
all-MiniLM-L6-v2 start, 400 training examples with a spurious source tag, 2 epochs of batch 32 at lr 5e-5;
300 examples per eval set). Every method starts from the same zero-shot model. Scores are accuracies on
``id_test`` (held-out in-distribution) and ``shifted`` (the tag points to a wrong label); ``id`` is only used
to choose (α, learned coefficients), as the demo does.

1. ``interpolation`` (issue 14): one plain fine-tuning run, then the methods that act on its two endpoints
   (``INTERPOLATION``: name -> function(ctx) -> Row). Inference time: wall time of evaluating id_test and
   shifted over that of the plain model, measured in the same run. Memory: elements each method holds beyond
   one model, read from its objects (at inference, and while fitting). Fit time: beyond plain training, over
   plain training time.
2. ``regularizers`` (issue 17): one training run per method from the same start (``REGULARIZERS``: name ->
   function(ctx) -> Row); train time over plain training (the loop from train begin to the last step, so a
   Fisher pass at train begin is in; a WiSE-FT sweep is added as its own cost).
3. ``overhead`` (issue 17): the median optimizer-step time of each training callback over plain training's,
   in ``--rounds`` interleaved rounds of ``--steps`` steps (the order rotates each round; the ratio is taken
   against the same round's plain run), as ``benchmarks/llm.py`` measures throughput.

A new method is one entry in ``INTERPOLATION`` or ``REGULARIZERS`` (a function of the shared ``Context``:
``ctx.start``/``ctx.model`` are the two endpoints, ``ctx.trainer`` evaluates the fine-tuned model,
``evaluate`` times the reported splits, ``ctx.train_with(name, callbacks)`` trains from the start and scores
the result)::

    def wemoe(ctx: Context) -> Row:            # on the endpoints of the plain run
        t0 = time.perf_counter(); upscaled = ...   # build/fit the method from ctx.start and ctx.model
        scores, seconds = evaluate(make_trainer(ctx.task, upscaled, ctx.out / "wemoe"), ctx.task)
        return Row(scores, seconds, extra_fit_seconds=..., infer_numel=..., fit_numel=...)
    INTERPOLATION["WEMoE"] = wemoe
    REGULARIZERS["RiFT"] = lambda ctx: ctx.train_with("RiFT", [RiFTCallback(...)])   # a training-time method

Each section is written between its markers in ``docs/benchmarks.md`` with the command; the tables also go
into the "Measured" sections of ``docs/dynamic_interpolation.md`` and ``docs/regularizers.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.llm import write_section  # noqa: E402
from robustft.demos import encoder as demo  # noqa: E402
from robustft.demos import llm as demo_llm  # noqa: E402
from robustft.demos.console import format_table  # noqa: E402
from robustft.demos.llm import step_clock  # noqa: E402

SPLITS = ("id_test", "shifted")  # reported; "id" chooses


@dataclass
class Task:
    """What the tables need of a task: a fresh start model, the data, the training budget and the metric."""

    start: Callable[[], Any]  # a new copy of the start model (α=0) at every call
    train: Any
    evals: dict[str, Any]  # "id" (choices are made here), "id_test", "shifted"
    collator: Callable
    args: Callable[..., Any]  # (output_dir, **overrides) -> TrainingArguments
    metrics: Callable  # compute_metrics, returns {"accuracy": ...}
    description: str
    seed: int = 0
    fisher_examples: int = 256  # single examples per Fisher estimate (EWC, FISH)
    learned_steps: int = 20  # Adam steps (lr 0.05) of the learned coefficients
    batch_size: int = 32


def demo_task(seed: int = 0, n_train: int = 400, n_eval: int = 300, epochs: float = 2.0,
              task: str = "topics") -> Task:
    """The ``robustft demo`` task (``task="glosses"``: ``robustft demo --task glosses``, WordNet definitions
    under a subpopulation shift), built by the demo's own functions."""
    from transformers import DataCollatorWithPadding

    model, tokenizer = demo.zero_shot_start(seed, task)
    train, evals = demo.encode_splits(tokenizer, seed, n_train, n_eval, task)
    return Task(
        start=lambda: copy.deepcopy(model), train=train, evals=evals,
        collator=DataCollatorWithPadding(tokenizer),
        args=lambda out, **kw: demo.training_arguments(out, seed, epochs, progress=False, **kw),
        metrics=demo.accuracy, seed=seed,
        description=f"`robustft demo{' --task glosses' if task == 'glosses' else ''}` task (all-MiniLM-L6-v2 "
        f"zero-shot start, {n_train} training examples, "
        f"{epochs:g} epochs of batch 32 at lr 5e-5, {n_eval} examples per eval set, seed {seed})",
    )


@dataclass
class Row:
    """One method's scores and costs (seconds are wall time in this run; numel are tensor elements)."""

    scores: dict[str, float]
    eval_seconds: float = math.nan  # evaluating the reported splits with the method's inference rule
    train_seconds: float = math.nan  # its own training run (nan: shares the plain run)
    extra_fit_seconds: float = 0.0  # beyond training: choosing α, fitting coefficients, Fisher, ...
    infer_numel: int = 0  # held beyond one model at inference
    fit_numel: int = 0  # held beyond one model while fitting (sweep copies, task vectors, ...)
    note: str = ""
    reference_seconds: float = math.nan  # the plain model's evaluation of the same splits, timed just before


def numel(model) -> int:
    """Floating elements of one model (parameters and buffers): the unit of the memory columns."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def make_trainer(task: Task, model, out: Path, callbacks=(), **overrides):
    """A Trainer of ``model`` with the task's data, collator, metric and training arguments."""
    from transformers import Trainer

    return Trainer(model=model, args=task.args(out, **overrides), train_dataset=task.train,
                   data_collator=task.collator, compute_metrics=task.metrics, callbacks=list(callbacks))


def evaluate(trainer, task: Task) -> tuple[dict[str, float], float]:
    """Accuracy on the reported splits with the model as it is, and the wall time that took."""
    t0 = time.perf_counter()
    scores = {s: trainer.evaluate(task.evals[s], metric_key_prefix=s)[f"{s}_accuracy"] for s in SPLITS}
    return scores, time.perf_counter() - t0


def loader(task: Task, split: str, labels: bool = True):
    """A seeded shuffled DataLoader of a split's collated batches (``labels=False``: unlabelled inputs)."""
    import torch
    from torch.utils.data import DataLoader

    ds = task.train if split == "train" else task.evals[split]
    if not labels:
        ds = ds.remove_columns("labels")
    g = torch.Generator().manual_seed(task.seed)
    return DataLoader(ds, batch_size=task.batch_size, shuffle=True, collate_fn=task.collator, generator=g)


class Context:
    """The shared plain fine-tuning run (both endpoints kept) and the runs several rows share."""

    def __init__(self, task: Task, out: Path):
        from robustft.interpolation.wise_ft import WiseFTWeights

        self.task, self.out = task, out
        self.start = task.start().eval()
        model = task.start()
        clock = step_clock()
        self.trainer = make_trainer(task, model, out / "plain", [clock])
        self.trainer.train()
        self.model = model.eval()
        self.n = numel(model)
        self.weights = WiseFTWeights.from_models(self.start, model)  # θ(α) written into the fine-tuned model
        self.selected = sum(p.numel() for p in self.weights.params.values())
        scores, seconds = evaluate(self.trainer, task)
        self.plain = Row(scores, seconds, train_seconds=clock.train_seconds)
        self.cache: dict[str, Any] = {}

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def curve(self, split: str) -> tuple[Any, float]:
        """The WiSE-FT curve of ``split`` alone (α chosen on it) and the seconds its sweep took."""
        from robustft.interpolation.wise_ft import wise_ft_sweep

        def sweep():
            t0 = time.perf_counter()
            curve = wise_ft_sweep(self.trainer, self.weights, {split: self.task.evals[split]}, split,
                                  apply_alpha=1.0, progress=False)
            return curve, time.perf_counter() - t0

        return self.once(f"curve_{split}", sweep)

    def at_alpha(self, alpha: float) -> tuple[dict[str, float], float]:
        """The reported scores of θ(α) (written into the fine-tuned model, then put back) and their time."""
        from robustft.interpolation.wise_ft import evaluate_at_alphas

        return evaluate_at_alphas(self.weights, [alpha], lambda _: evaluate(self.trainer, self.task))[0]

    def train_with(self, name: str, callbacks: list, pre_seconds: float = 0.0, model=None,
                   **overrides) -> Row:
        """A training run from the start (or from ``model``, a prepared copy of it) with ``callbacks`` and
        training-argument ``overrides``: its scores, its train time (the loop, plus ``pre_seconds``) and, as
        extra fit time, what ran after the last step (a WiSE-FT sweep)."""
        model = self.task.start() if model is None else model
        clock = step_clock()
        trainer = make_trainer(self.task, model, self.out / name.replace(" ", "_"), [clock, *callbacks],
                               **overrides)
        trainer.train()
        after = time.perf_counter() - clock.last_step_end
        model.eval()
        scores, seconds = evaluate(trainer, self.task)
        return Row(scores, seconds, train_seconds=clock.train_seconds + pre_seconds, extra_fit_seconds=after)


# -- issue 14: the methods on the two endpoints of one fine-tuning run ---------------------------------------
def plain(ctx: Context) -> Row:
    return ctx.plain


def plain_again(ctx: Context) -> Row:
    """The plain model evaluated once more: beside its reference timing, the noise of the time ratios."""
    return replace(ctx.plain, eval_seconds=evaluate(ctx.trainer, ctx.task)[1])


def zero_shot(ctx: Context) -> Row:
    """The start model (α=0), where the static curve begins."""
    return Row(*ctx.at_alpha(0.0))


def wise_ft(ctx: Context, oracle: bool = False) -> Row:
    curve, seconds = ctx.curve("shifted" if oracle else "id")
    alpha = curve.chosen_alpha
    scores, eval_seconds = ctx.at_alpha(alpha)
    note = f"α={alpha:g}" + (" chosen on the shifted labels (not available in practice)" if oracle else "")
    return Row(scores, eval_seconds, extra_fit_seconds=seconds,
               fit_numel=ctx.weights.stored_numel() + ctx.selected, note=note)


def dawin(ctx: Context, n_components: int = 3) -> Row:
    from robustft.interpolation.dawin import dawin_evaluate

    t0 = time.perf_counter()
    result = dawin_evaluate(ctx.trainer, ctx.weights, {s: ctx.task.evals[s] for s in SPLITS}, n_components)
    seconds = time.perf_counter() - t0
    comps = "; ".join(f"{s}: " + ", ".join(f"{a:.2f}×{c}" for a, c in zip(result.alphas[s], result.counts[s],
                                                                           strict=True)) for s in SPLITS)
    return Row(dict(result.results), seconds, infer_numel=ctx.weights.stored_numel() + ctx.selected,
               note=f"K={n_components}, components α×inputs {comps}")


def learned(ctx: Context, objective: str, split: str) -> Row:
    """Per-layer coefficients (aTLAS: loss on labelled ``split``; AdaMerging: entropy on its inputs alone)."""
    from robustft.interpolation.learned import LearnedInterpolation

    task = ctx.task
    t0 = time.perf_counter()
    interp = LearnedInterpolation(ctx.start, [ctx.model], blocks="layer", init=0.3)
    coef = interp.fit(loader(task, split, labels=objective == "loss"), objective=objective,
                      steps=task.learned_steps, lr=0.05, clamp=(0.0, 1.0))
    fit_seconds = time.perf_counter() - t0
    merged = copy.deepcopy(ctx.start)
    interp.apply_to(merged)
    scores, seconds = evaluate(make_trainer(task, merged, ctx.out / "learned"), task)
    return Row(scores, seconds, extra_fit_seconds=fit_seconds, fit_numel=interp.stored_numel() + ctx.selected,
               note=f"{coef.numel()} coefficients, {task.learned_steps} Adam steps, α in "
               f"[{float(coef.min()):.2f}, {float(coef.max()):.2f}] (mean {float(coef.mean()):.2f})")


def wemoe(ctx: Context, split: str) -> Row:
    """WEMoE, K=1 (the fine-tuned model the one expert), routers trained by entropy on ``split``'s inputs."""
    from robustft import fit_wemoe

    task = ctx.task
    t0 = time.perf_counter()
    model = fit_wemoe(ctx.start, ctx.model, loader(task, split, labels=False), steps=task.learned_steps,
                      lr=WEMOE_LR)
    fit_seconds = time.perf_counter() - t0
    model.eval()
    scores, seconds = evaluate(make_trainer(task, model, ctx.out / f"wemoe_{split}"), task)
    routers = sum(p.numel() for n, p in model.named_parameters() if ".wemoe_router." in f".{n}")
    extra = numel(model) - ctx.n  # the MLP task vectors and the routers
    # fitting holds the start, the fine-tuned model and the upscaled copy: 2 models + extra beyond one
    return Row(scores, seconds, extra_fit_seconds=fit_seconds, infer_numel=extra, fit_numel=2 * ctx.n + extra,
               note=f"{(extra - routers) / 1e6:.1f}M task-vector + {routers / 1e6:.1f}M router elements; "
               f"{task.learned_steps} Adam steps at lr {WEMOE_LR:g}, non-MLP weights at α=0.3")


WEMOE_LR = 1e-3  # FusionBench's 1e-4 is for 1000 steps; the table's budget is ``learned_steps`` (20)

# -- issue 27: the straggler-layer remedy and BANG ------------------------------------------------------
STRAGGLER_ALPHAS = [0.0, 0.5, 1.0]  # the diagnostic costs layers × α × 2 passes over the probe
STRAGGLER_DENSITY = 0.1  # fraction of a straggler tensor's task vector "sparsify" keeps


def stragglers(ctx: Context, treatment: str, k: int = 1) -> Row:
    """The sharpest block(s) along the WiSE-FT path of the plain run (layer-wise adaptive sharpness, ρ=0.01,
    one ascent step, on 16 id examples) treated (``treatment``), then WiSE-FT with α* chosen on id."""
    from robustft.analysis.sharpness import sharpness_along_path, straggler_layers, treat_stragglers
    from robustft.interpolation.wise_ft import WiseFTWeights, evaluate_at_alphas, wise_ft_sweep

    task = ctx.task

    def measure():
        probe = task.collator([task.evals["id"][i] for i in range(16)])
        t0 = time.perf_counter()
        modules = dict(ctx.model.named_modules())  # the demo's SentenceClassifier or a tiny BERT in the tests
        embeddings = min((n for n in modules if n.split(".")[-1] == "embeddings"), key=len)
        layers = [embeddings, *transformer_blocks(ctx.model), *(n for n in ("classifier",) if n in modules)]
        report = sharpness_along_path(ctx.start, ctx.model, probe, STRAGGLER_ALPHAS, layers, steps=1)
        return report, time.perf_counter() - t0

    report, seconds = ctx.once("straggler_report", measure)
    chosen = straggler_layers(report, k)
    t0 = time.perf_counter()
    s, e = treat_stragglers(ctx.start, ctx.model, chosen, treatment, STRAGGLER_DENSITY)
    start, end = task.start().eval(), task.start().eval()
    start.load_state_dict(s)
    end.load_state_dict(e)
    weights = WiseFTWeights.from_models(start, end)
    trainer = make_trainer(task, end, ctx.out / f"stragglers_{treatment}")
    curve = wise_ft_sweep(trainer, weights, {"id": task.evals["id"]}, "id", apply_alpha=1.0, progress=False)
    fit = seconds + time.perf_counter() - t0
    alpha = curve.chosen_alpha
    scores, eval_seconds = evaluate_at_alphas(weights, [alpha], lambda _: evaluate(trainer, task))[0]
    what = {"sparsify": f"task vector top {STRAGGLER_DENSITY:.0%} kept", "start": "kept at the start",
            "finetuned": "fine-tuned at every α"}[treatment]
    return Row(scores, eval_seconds, extra_fit_seconds=fit, fit_numel=2 * ctx.n + weights.stored_numel(),
               note=f"straggler {', '.join(chosen)} ({what}); α={alpha:g}")


BANG_SMOOTHING, BANG_MIXUP = 0.1, 0.4


def bang(ctx: Context, recipe: str) -> Row:
    """BANG (examples/bang_wise_ft.py): fine-tune with label smoothing and/or mixup, WiSE-FT at α* on id."""
    sys.path.insert(0, str(ROOT / "examples"))
    import bang_wise_ft

    from robustft import WiseFTCallback

    task = ctx.task
    model = task.start()
    wise = WiseFTCallback(eval_datasets={"id": task.evals["id"]}, id_dataset="id", progress=False,
                          save_curve=False)
    clock = step_clock()
    smoothing = BANG_SMOOTHING if recipe in ("smoothing", "both") else 0.0
    kwargs = dict(model=model, args=task.args(ctx.out / f"bang_{recipe}", label_smoothing_factor=smoothing),
                  train_dataset=task.train, data_collator=task.collator, compute_metrics=task.metrics,
                  callbacks=[clock, wise])
    if recipe in ("mixup", "both"):
        trainer = bang_wise_ft.MixupTrainer(**kwargs, mixup_alpha=BANG_MIXUP, mixup_seed=task.seed)
    else:
        from transformers import Trainer

        trainer = Trainer(**kwargs)
    trainer.train()  # ends at θ(α*)
    after = time.perf_counter() - clock.last_step_end
    model.eval()
    scores, seconds = evaluate(trainer, task)
    parts = [f"label smoothing {smoothing:g}"] if smoothing else []
    if recipe != "smoothing":
        parts.append(f"mixup Beta({BANG_MIXUP:g}, {BANG_MIXUP:g}) of the head's inputs")
    note = f"{' + '.join(parts)}; α={wise.curve.chosen_alpha:g}; own training run"
    return Row(scores, seconds, train_seconds=clock.train_seconds, extra_fit_seconds=after,
               fit_numel=2 * ctx.n, note=note)


INTERPOLATION: dict[str, Callable[[Context], Row]] = {
    "zero-shot start (α=0)": zero_shot,
    "plain fine-tuning (α=1)": plain_again,
    "WiSE-FT, α* chosen on id": wise_ft,
    "WiSE-FT, best α on shifted (oracle)": lambda ctx: wise_ft(ctx, oracle=True),
    "DaWin (per-input α, K=3)": dawin,
    "learned per-layer α, loss on id (aTLAS)": lambda ctx: learned(ctx, "loss", "id"),
    "learned per-layer α, entropy on shifted inputs (AdaMerging)":
        lambda ctx: learned(ctx, "entropy", "shifted"),
    "WEMoE (K=1, routers by entropy on unlabelled shifted inputs)": lambda ctx: wemoe(ctx, "shifted"),
    "WEMoE (K=1, routers by entropy on id inputs)": lambda ctx: wemoe(ctx, "id"),
    "straggler block sparsified, then WiSE-FT α* on id": lambda ctx: stragglers(ctx, "sparsify"),
    "straggler block kept at the start, then WiSE-FT α* on id": lambda ctx: stragglers(ctx, "start"),
    "BANG: label smoothing, then WiSE-FT α* on id": lambda ctx: bang(ctx, "smoothing"),
    "BANG: label smoothing + mixup, then WiSE-FT α* on id": lambda ctx: bang(ctx, "both"),
}


# -- issue 17: training-time methods, one run each -----------------------------------------------------------
def fisher_of_start(task: Task) -> tuple[dict, float]:
    """The empirical Fisher of the start model on the training data, and the seconds it took."""
    from robustft.merge import estimate_fisher

    t0 = time.perf_counter()
    fisher = estimate_fisher(task.start(), loader(task, "train"), max_examples=task.fisher_examples)
    return fisher, time.perf_counter() - t0


def regularizer_callbacks(task: Task, name: str) -> tuple[list, float]:
    """The callbacks of one training-time method and the seconds spent preparing them (a Fisher estimate)."""
    import torch

    from robustft import (
        ContinualBackpropCallback,
        EWCCallback,
        L2SPCallback,
        LPFTCallback,
        MGPOCallback,
        ShrinkPerturbCallback,
        SparseUpdateCallback,
        SpectralRegCallback,
        WassersteinRegCallback,
    )

    if name == "plain":
        return [], 0.0
    if name == "L2-SP":
        return [L2SPCallback(1.0)], 0.0
    if name == "EWC":
        fisher, seconds = fisher_of_start(task)  # λ = 1/mean(F): the L2-SP strength on average
        mean = float(torch.cat([f.flatten() for f in fisher.values()]).mean())
        return [EWCCallback(1.0 / mean, fisher=fisher)], seconds
    if name == "spectral":
        return [SpectralRegCallback(1.0, include=r"\.layer\.\d+\.")], 0.0
    if name == "FISH mask":
        return [SparseUpdateCallback(0.005, fisher_data=loader(task, "train"),
                                     fisher_examples=task.fisher_examples)], 0.0
    if name == "magnitude mask":
        return [SparseUpdateCallback(0.005, scores="magnitude")], 0.0
    if name == "shrink-perturb":
        return [ShrinkPerturbCallback(shrink=0.99, sigma=1e-3, every_n_steps=10, seed=task.seed)], 0.0
    if name == "LP-FT":
        return [LPFTCallback(probe_epochs=1)], 0.0
    if name == "Wasserstein to init":
        return [WassersteinRegCallback(1.0)], 0.0
    if name == "continual backprop":
        return [ContinualBackpropCallback(replacement_rate=1e-3, maturity_threshold=10, seed=task.seed)], 0.0
    if name == "MGPO":
        return [MGPOCallback(rho=0.05, beta=0.9)], 0.0
    raise ValueError(f"unknown training-time method {name!r}")


REGULARIZER_SETTINGS = {
    "L2-SP": "λ=1, loss form",
    "EWC": "λ=1/mean(F), F on 256 training examples at the start",
    "spectral": "λ=1, σ₁ of every encoder-layer matrix held at its start value",
    "FISH mask": "0.5% of the weights by Fisher (256 examples)",
    "magnitude mask": "0.5% of the weights by abs(θ_start)",
    "shrink-perturb": "θ ← 0.99·θ + 0.001·ε every 10 steps",
    "LP-FT": "probe 1 epoch (head only), then 1 epoch full",
    "Wasserstein to init": "λ=1, sorted entries of every trainable tensor against their start",
    "continual backprop": "ρ=1e-3, m=10, η=0.99, units of the 6 BERT MLP blocks, init N(0, 0.02²)",
    "MGPO": "ρ=0.05, β=0.9 (the paper's NLU setting); no LoRA here: one layer per trainable tensor",
}


def trained(name: str) -> Callable[[Context], Row]:
    def run(ctx: Context) -> Row:
        callbacks, seconds = regularizer_callbacks(ctx.task, name)
        return replace(ctx.train_with(name, callbacks, seconds), extra_fit_seconds=0.0,
                       note=REGULARIZER_SETTINGS[name])

    return run


def lpft_wise(ctx: Context) -> Row:
    """LP-FT with WiseFTCallback in the same run (θ(α) from the probed model), α chosen on id."""
    from robustft import LPFTCallback, WiseFTCallback

    wise = WiseFTCallback(eval_datasets={"id": ctx.task.evals["id"]}, save_curve=False, progress=False)
    row = ctx.train_with("LP-FT + WiSE-FT", [LPFTCallback(probe_epochs=1), wise])
    alpha = wise.curve.chosen_alpha  # the model is left at θ(α*): the row's scores are its
    return replace(row, note=f"α={alpha:g} from the probed model; the extra time is the α sweep on id")


def transformer_blocks(model) -> list[str]:
    """The encoder's transformer blocks (``...layer.<i>``): RiFT's candidates at block granularity."""
    return [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?layer\.\d+", n)]


RIFT_LR = 5e-4  # 10x the demo's: one module alone moves little in the demo's 26 steps at 5e-5


def rift(ctx: Context, blocks: bool = False) -> Row:
    """RiFT: the least critical module on a training batch (MRC, RiFT's ε=0.1 and 10 steps), trained alone at
    ``RIFT_LR``, then WiSE-FT with α chosen on id (the callback interpolates the trained module only)."""
    from robustft import WiseFTCallback, least_critical_module

    task = ctx.task
    model = task.start()
    batch = next(iter(loader(task, "train")))
    t0 = time.perf_counter()
    name = least_critical_module(model, batch, modules=transformer_blocks(model) if blocks else None)
    pre = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(f"{name}."))
    trained_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wise = WiseFTCallback(eval_datasets={"id": task.evals["id"]}, save_curve=False, progress=False)
    row = ctx.train_with("RiFT blocks" if blocks else "RiFT", [wise], pre, model=model, learning_rate=RIFT_LR)
    return replace(row, note=f"module {name} ({trained_numel} weights), lr {RIFT_LR:g}, "
                   f"α={wise.curve.chosen_alpha:g}; train time includes the MRC measurement")


REGULARIZERS: dict[str, Callable[[Context], Row]] = {
    "plain fine-tuning": plain,
    "WiSE-FT, α* chosen on id": wise_ft,
    **{name: trained(name) for name in REGULARIZER_SETTINGS},
    "LP-FT + WiSE-FT": lpft_wise,
    "RiFT (least critical module, then WiSE-FT)": rift,
    "RiFT, modules = the transformer blocks": lambda ctx: rift(ctx, blocks=True),
}


# -- tables --------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    """An accuracy in percent, one decimal."""
    return f"{100 * x:.1f}"


def ratio(x: float, base: float) -> str:
    """x/base as "1.23x", "-" when x was not measured."""
    return "-" if math.isnan(x) else f"{x / base:.2f}x"


def run_rows(variants: dict[str, Callable[[Context], Row]], ctx: Context, time_plain: bool = False
             ) -> dict[str, Row]:
    """Each variant's row; ``time_plain``: the plain model's evaluation timed just before each, as its
    reference (the load of a shared machine drifts between rows, not within a few seconds)."""
    rows = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        reference = evaluate(ctx.trainer, ctx.task)[1] if time_plain else math.nan
        rows[name] = replace(fn(ctx), reference_seconds=reference)
        print(f"{name}: {rows[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def interpolation_table(rows: dict[str, Row], ctx: Context) -> str:
    train = ctx.plain.train_seconds
    return format_table(
        ["method", "id_test acc %", "shifted acc %", "inference time", "extra memory at inference",
         "extra fit time", "extra memory to fit", "notes"],
        [[name, pct(r.scores["id_test"]), pct(r.scores["shifted"]),
          ratio(r.eval_seconds, r.reference_seconds), f"{r.infer_numel / ctx.n:.2f} models",
          f"{r.extra_fit_seconds / train:.2f}x", f"{r.fit_numel / ctx.n:.2f} models", r.note]
         for name, r in rows.items()],
    )


def regularizer_table(rows: dict[str, Row], ctx: Context) -> str:
    base = ctx.plain.train_seconds

    def train_time(r: Row) -> str:
        own = base if math.isnan(r.train_seconds) else r.train_seconds
        return f"{(own + r.extra_fit_seconds) / base:.2f}x"

    return format_table(
        ["method", "id_test acc %", "shifted acc %", "train time", "setting"],
        [[name, pct(r.scores["id_test"]), pct(r.scores["shifted"]), train_time(r), r.note]
         for name, r in rows.items()],
    )


def reading(rows: dict[str, Row], reference: str) -> str:
    """One sentence per method: points above/below the reference row on each split (measured, not judged)."""
    ref = rows[reference].scores
    better, parts = [], []
    for name, r in rows.items():
        if name == reference:
            continue
        d = {s: 100 * (r.scores[s] - ref[s]) for s in SPLITS}
        parts.append(f"{name} {d['id_test']:+.1f} / {d['shifted']:+.1f}")
        if d["shifted"] > 0 and d["id_test"] >= -1.0:
            better.append(name)
    verdict = (f"Better than it under shift at most 1 point lower in distribution: {', '.join(better)}."
               if better else "No method beats it under shift without losing over 1 point in distribution.")
    return (f"Against {reference} (points, id_test / shifted): " + "; ".join(parts) + ". " + verdict)


# -- the LLM task (robustft demo --llm): LoRA on SmolLM2-135M-Instruct --------------------------------------
LLM_SPLITS = ("id", "shifted", "retained")
LLM_L2SP = 1.0  # λ of L2-SP and of EWC's λ·mean(F) (EWC: λ = 1/mean(F)), as on the encoder


def llm_rows(cfg, out: Path, task=None) -> tuple[dict[str, Row], str, int]:
    """The cheap rows on the LLM demo task (robustft.demos.llm's set-up, trainer and scores), its description
    and the elements of one model. Row scores are mean answer-token losses (lower is better)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from robustft import EWCCallback, L2SPCallback, WiseFTCallback
    from robustft.interpolation.dawin import dawin_evaluate
    from robustft.interpolation.learned import LearnedInterpolation
    from robustft.lora.io import adapter_from_peft_model
    from robustft.merge import estimate_fisher

    task = task or demo_llm.prepare_llm_task(cfg, verbose=False)
    evals = task.evals

    def scored(trainer, name: str) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        return demo_llm.evaluate_losses(trainer, evals, name), time.perf_counter() - t0

    def base_model():
        return AutoModelForCausalLM.from_pretrained(task.model_dir, dtype=torch.float32)

    def train(name: str, callbacks=(), prepare=None) -> tuple[Any, Any, float]:
        clock = step_clock()
        trainer = demo_llm.lora_trainer(task, cfg, out / name, [clock, *callbacks])
        pre = prepare(trainer) if prepare else 0.0
        trainer.train()
        return trainer, clock, clock.train_seconds + pre

    rows: dict[str, Row] = {}
    wise = WiseFTCallback(alphas=cfg.alphas, eval_datasets=evals, id_dataset="id", metric="eval_loss",
                          greater_is_better=False, progress=False, save_curve=False)
    adapter = {}

    class KeepAdapter(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):  # before WiSE-FT writes θ(α*)
            adapter["end"] = adapter_from_peft_model(model)

    clock = step_clock()
    trainer = demo_llm.lora_trainer(task, cfg, out / "plain", [clock, KeepAdapter(), wise],
                                    eval_dataset=evals)
    tokenized = trainer.eval_dataset  # DaWin's predict passes and the coefficient fit read these
    base, base_seconds = scored(trainer, "base")
    trainer.train()
    plain_train = clock.train_seconds
    sweep = time.perf_counter() - clock.last_step_end
    t0 = time.perf_counter()
    dawin = dawin_evaluate(trainer, wise.weights, tokenized, 3, metric="loss")  # puts θ(α*) back
    dawin_seconds = time.perf_counter() - t0
    plain_seconds = scored(trainer, "plain")[1]  # θ(α*): LoRA's cost at any α; the scores are the curve's
    plain = {s: wise.curve.value(s, 1.0) for s in LLM_SPLITS}
    n = numel(trainer.model.get_base_model())  # the base model and its adapter
    adapted = sum(p.numel() for p in wise.weights.params.values())
    a = wise.curve.chosen_alpha
    rows["base model (α=0)"] = Row(base, base_seconds, train_seconds=0.0)
    rows["plain LoRA"] = Row(plain, plain_seconds, train_seconds=plain_train, reference_seconds=plain_seconds)
    rows["WiSE-FT, α* chosen on id"] = Row({s: wise.curve.value(s, a) for s in LLM_SPLITS}, plain_seconds,
                                           extra_fit_seconds=sweep, fit_numel=2 * adapted,
                                           reference_seconds=plain_seconds,
                                           note=f"α={a:g} (B ← α·B); inference as plain LoRA")
    comps = "; ".join(f"{s}: " + ", ".join(f"{x:.2f}×{c}" for x, c in zip(dawin.alphas[s], dawin.counts[s],
                                                                          strict=True)) for s in LLM_SPLITS)
    rows["DaWin (per-sequence mean token entropy, K=3)"] = Row(
        dict(dawin.results), dawin_seconds, infer_numel=2 * adapted, reference_seconds=plain_seconds,
        note=f"components α×sequences {comps}")

    t0 = time.perf_counter()
    model = base_model().eval()
    interp = LearnedInterpolation.from_lora(model, [adapter["end"]], blocks="layer", init=0.3)
    fit_loader = trainer.get_eval_dataloader(tokenized["id"])
    coef = interp.fit(fit_loader, objective="loss", steps=task_steps(cfg), lr=0.05, clamp=(0.0, 1.0))
    fit_seconds = time.perf_counter() - t0
    fit_numel = interp.stored_numel()
    interp.apply_to(model)
    del interp, trainer
    learned, seconds = scored(demo_llm.lora_trainer(task, cfg, out / "learned", model=model), "learned")
    rows["learned per-layer α on the LoRA delta, loss on id (aTLAS)"] = Row(
        learned, seconds, extra_fit_seconds=fit_seconds, fit_numel=fit_numel, reference_seconds=plain_seconds,
        note=f"{coef.numel()} coefficients, {task_steps(cfg)} Adam steps, α in [{float(coef.min()):.2f}, "
        f"{float(coef.max()):.2f}] (mean {float(coef.mean()):.2f}); merged into the base weights")
    del model

    trainer, clock, seconds = train("l2sp", [L2SPCallback(LLM_L2SP)])
    rows["L2-SP on the LoRA factors"] = Row(*scored(trainer, "l2sp"), train_seconds=seconds,
                                            reference_seconds=plain_seconds,
                                            note=f"λ={LLM_L2SP:g}, anchor = the adapter at train begin (B=0)")
    del trainer

    ewc = {}

    def fisher(trainer) -> float:  # on the LoRA factors of the wrapped model, before training
        t0 = time.perf_counter()
        f = estimate_fisher(trainer.model, trainer.get_train_dataloader(), max_examples=cfg.n_train)
        mean = float(torch.cat([v.flatten() for v in f.values()]).mean())
        ewc["cb"] = EWCCallback(LLM_L2SP / mean, fisher=f)
        trainer.add_callback(ewc["cb"])
        return time.perf_counter() - t0

    trainer, clock, seconds = train("ewc", prepare=fisher)
    rows["EWC on the LoRA factors"] = Row(*scored(trainer, "ewc"), train_seconds=seconds,
                                          reference_seconds=plain_seconds,
                                          note=f"λ=1/mean(F), F on the {cfg.n_train} training examples")
    del trainer
    rows["WEMoE"] = Row({s: math.nan for s in LLM_SPLITS}, note="not run: WEMoE upscales full fine-tuned MLP "
                        "weights; a LoRA run has no MLP task vector until its adapter is merged")
    rows = {k: replace(r, reference_seconds=plain_seconds, train_seconds=(  # the others share the plain run
        plain_train if math.isnan(r.train_seconds) else r.train_seconds)) for k, r in rows.items()}
    description = (f"`robustft demo --llm` fast setting (SmolLM2-135M-Instruct, LoRA r={cfg.rank} on all "
                   f"linear layers, {cfg.n_train} WordNet glosses, {cfg.steps} steps of batch "
                   f"{cfg.batch_size} at lr {cfg.learning_rate:g}, {len(evals['id'])}/"
                   f"{len(evals['shifted'])}/{len(evals['retained'])} id/shifted/retained sequences, seed "
                   f"{cfg.seed}; a model is "
                   f"{n / 1e6:.1f}M elements, the adapter {adapted / 1e6:.2f}M)")
    return rows, description, n


def task_steps(cfg) -> int:
    """Adam steps of the learned coefficients on the LLM task: the demo's training steps."""
    return cfg.steps


def llm_table(rows: dict[str, Row], n: int) -> str:
    def loss(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.4f}"

    plain = rows["plain LoRA"].train_seconds
    return format_table(
        ["method", "id loss", "shifted loss", "retained loss", "inference time", "extra memory at inference",
         "train + fit time", "extra memory to fit", "notes"],
        [[name, *(loss(r.scores[s]) for s in LLM_SPLITS), ratio(r.eval_seconds, r.reference_seconds),
          f"{r.infer_numel / n:.3f} models", "-" if math.isnan(r.scores["id"]) else
          f"{(r.train_seconds + r.extra_fit_seconds) / plain:.2f}x", f"{r.fit_numel / n:.3f} models", r.note]
         for name, r in rows.items()],
    )


# -- per-step overhead ---------------------------------------------------------------------------------------
OVERHEAD_VARIANTS = ("plain", "L2-SP", "EWC", "spectral", "FISH mask", "magnitude mask", "shrink-perturb",
                     "LP-FT")


def overhead(task: Task, out: Path, rounds: int, steps: int,
             variants=OVERHEAD_VARIANTS) -> dict[str, list[float]]:
    """Per variant, per round: its median step time over that round's plain median step time."""
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants[r % len(variants):]) + list(variants[: r % len(variants)])
        median = {}
        for v in order:
            callbacks, _ = regularizer_callbacks(task, v)
            clock = step_clock()
            run_dir = out / f"overhead_{r}_{v}"
            make_trainer(task, task.start(), run_dir, [clock, *callbacks], max_steps=steps).train()
            median[v] = statistics.median(clock.step_seconds[1:] or clock.step_seconds)
            print(f"round {r + 1}/{rounds} {v:15s} median step {median[v]:.3f} s", flush=True)
        for v in variants:
            ratios[v].append(median[v] / median["plain"])
    return ratios


def overhead_table(ratios: dict[str, list[float]]) -> str:
    return format_table(
        ["callback", "step time / plain (median)", "range"],
        [[v, f"{statistics.median(r):.2f}x", f"{min(r):.2f}-{max(r):.2f}x"] for v, r in ratios.items()],
    )


# -- documents -----------------------------------------------------------------------------------------------
MARKERS = {
    "interpolation": ("<!-- robustness-interpolation:start -->", "<!-- robustness-interpolation:end -->"),
    "regularizers": ("<!-- robustness-regularizers:start -->", "<!-- robustness-regularizers:end -->"),
    "overhead": ("<!-- robustness-overhead:start -->", "<!-- robustness-overhead:end -->"),
}
FEATURE_DOC = {"interpolation": "dynamic_interpolation.md", "regularizers": "regularizers.md"}
LLM_MARKERS = ("<!-- robustness-llm:start -->", "<!-- robustness-llm:end -->")  # in all three documents


def llm_section(out: Path, command: str, cfg=None) -> str:
    """The LLM task's table (``--llm``): markdown with the command, the columns' meaning and the table."""
    import torch

    cfg = cfg or demo_llm.FAST
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start"
    rows, description, n = llm_rows(cfg, out)
    print(rows, flush=True)
    return "\n".join([
        "### Measured: the issue 14 and 17 methods on the LLM task", "",
        f"Command: `{command}` ({description}; {load}, {torch.get_num_threads()} torch thread(s); timings "
        f"are wall time in this one run; load average {os.getloadavg()[0]:.1f} at the end).", "",
        "Mean answer-token loss (lower is better; retained: the base model's own answers to general prompts, "
        "so the base scores best there by construction). Inference time: scoring the three sets with the "
        "method's rule over plain LoRA's scoring. Memory in models (tensor elements beyond one model: "
        "DaWin holds the start and end adapters, the learned fit the dense LoRA deltas ΔW). Train + fit "
        "time: its own training loop (or the plain run it shares), plus the α sweep, the coefficient fit "
        "or the Fisher estimate, over plain LoRA's loop.", "",
        llm_table(rows, n),
    ])


def build_sections(task: Task, out: Path, only: list[str], rounds: int, steps: int, command: str,
                   interpolation: dict | None = None, regularizers: dict | None = None) -> dict[str, str]:
    """Run the chosen sections; returns section name -> markdown (heading, command, table, reading)."""
    import torch

    load = (f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start, "
            f"{torch.get_num_threads()} torch thread(s)")
    head = f"Command: `{command}` ({task.description}; {load}; timings are wall time in this one run)."
    sections = {}
    ctx = Context(task, out) if {"interpolation", "regularizers"} & set(only) else None
    if "interpolation" in only:
        rows = run_rows(interpolation or INTERPOLATION, ctx, time_plain=True)
        sections["interpolation"] = "\n".join([
            "### Measured: WiSE-FT, DaWin and learned coefficients on the demo task (issue 14)", "", head, "",
            "Accuracy in %. Inference time: evaluating id_test and shifted with the method's rule over the "
            "plain model's evaluation timed just before it (the plain row: the same evaluation twice, i.e. "
            "the noise of these ratios). Memory: tensor elements held beyond one model, in models (at "
            "inference; while choosing α / fitting coefficients, the sweep's start and end copies or the "
            "task vectors and the composed weights). Extra fit time: beyond plain training, over plain "
            "training time (the α sweep on its split, the coefficient fit).", "",
            interpolation_table(rows, ctx), "", reading(rows, "WiSE-FT, α* chosen on id"),
        ])
    if "regularizers" in only:
        rows = run_rows(regularizers or REGULARIZERS, ctx)
        sections["regularizers"] = "\n".join([
            "### Measured: training-time methods on the demo task (issue 17)", "", head, "",
            "Accuracy in %. Train time: the training loop (train begin to the last step; a Fisher estimate "
            "and a WiSE-FT sweep added) over plain fine-tuning's. One untuned setting per method (column "
            "`setting`).", "",
            regularizer_table(rows, ctx), "",
            reading(rows, "plain fine-tuning") + " " + reading(rows, "WiSE-FT, α* chosen on id"),
        ])
    if "overhead" in only:
        ratios = overhead(replace(task, fisher_examples=min(task.fisher_examples, 32)), out, rounds, steps)
        sections["overhead"] = "\n".join([
            "### Measured: per-step overhead of the training-time callbacks (issue 17)", "", head, "",
            f"{rounds} interleaved rounds of {steps} optimizer steps per callback (the order rotates every "
            "round); the median step after the first, over the same round's plain median step. Work done "
            "once at train begin (a Fisher estimate) is not in a step; shrink-perturb acts every 10 steps "
            "and LP-FT's probe lasts one epoch, so short runs show their ordinary steps.", "",
            overhead_table(ratios), "",
            f"Load average {os.getloadavg()[0]:.1f} after.",
        ])
    return sections


def task_markers(name: str, task: str) -> tuple[str, str]:
    """A section's doc markers: the demo task's, or the gloss task's own (``robustness-NAME-glosses``)."""
    start, end = MARKERS[name]
    return (start, end) if task == "topics" else (start.replace(":start", f"-{task}:start"),
                                                  end.replace(":end", f"-{task}:end"))


def write_docs(sections: dict[str, str], docs: Path = ROOT / "docs", task: str = "topics") -> None:
    for name, text in sections.items():
        start, end = task_markers(name, task)
        write_section(text, docs / "benchmarks.md", start, end)
        if name in FEATURE_DOC:
            write_section(text, docs / FEATURE_DOC[name], start, end)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=list(MARKERS), help="sections to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("topics", "glosses"), default="topics",
                   help="the encoder task: robustft demo's (default) or --task glosses (WordNet definitions, "
                   "a subpopulation shift); the gloss task's tables go between their own markers")
    p.add_argument("--rounds", type=int, default=3, help="interleaved overhead rounds")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per overhead run")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "robustft_robustness_benchmark"))
    p.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    p.add_argument("--eval-size", type=int, default=300, help="examples per eval split (the demo's 300)")
    p.add_argument("--train-size", type=int, default=400, help="training examples (the demo's 400)")
    p.add_argument("--epochs", type=float, default=2.0, help="training epochs (the demo's 2)")
    p.add_argument("--rows", action="append", default=None,
                   help="only the rows whose name contains one of these (with --no-write: a partial table)")
    p.add_argument("--llm", action="store_true",
                   help="the LLM task's table instead (robustft demo --llm, fast setting)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    given = argv if argv is not None else sys.argv[1:]
    command = ("python benchmarks/robustness.py " + " ".join(given)).strip()
    if args.llm:
        text = llm_section(Path(args.out) / "llm", command)
        print(text)
        if not args.no_write:
            for doc in ("benchmarks.md", *FEATURE_DOC.values()):
                write_section(text, ROOT / "docs" / doc, *LLM_MARKERS)
        return 0
    only = args.only or list(MARKERS)
    pick = (lambda table: {k: v for k, v in table.items() if any(r in k for r in args.rows)}) if args.rows \
        else (lambda table: None)
    task = demo_task(args.seed, n_train=args.train_size, n_eval=args.eval_size, epochs=args.epochs,
                     task=args.task)
    sections = build_sections(task, Path(args.out) / args.task, only, args.rounds, args.steps, command,
                              pick(INTERPOLATION), pick(REGULARIZERS))
    print("\n\n".join(sections.values()))
    if not args.no_write:
        write_docs(sections, task=args.task)
        print(f"\nwritten to {ROOT / 'docs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
