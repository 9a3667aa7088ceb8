"""A strength sweep: one training run per strength of a training-time method, chosen on in-distribution data.

Anchor penalties (L2-SP, EWC, spectral), SAM's ρ, the EMA decay and shrink-and-perturb's λ/σ all have a
strength that transfers badly between tasks (issue 28: L2-SP at λ=1 gains 17 points under shift on the demo
task and loses 3 on another). :func:`strength_sweep` trains once per strength with a callback the user's
factory builds (``strength -> callback``), evaluates every run's end point on every eval set with
``trainer.evaluate``, and chooses the strength on the in-distribution set only, with the WiSE-FT rule
(:func:`robustft.interpolation.wise_ft.choose_alpha`: best ID metric, ties to the lowest ID loss, then the
smallest strength), optionally under a forgetting budget (the α rule's
:class:`~robustft.interpolation.wise_ft.AlphaBudget`: the best ID metric among the runs whose budget metric is
within ε of the start model's, measured once before training). ``wise_ft="each"`` sweeps WiSE-FT's α on every
run's end point (the table then holds each run at its own α*, chosen on ID), ``wise_ft="chosen"`` on the
chosen run's only.

Cost: one full training run per strength (plus the evaluations). No cheaper proxy is sound in general: the
penalised optimum has no closed form for a network, WiSE-FT's θ(α) path is a different family of models (the
numbers in docs/regularizers.md differ), warm-starting one strength from another changes the result with the
order, and a short-run ranking is unsafe because a penalty's effect grows as the weights move away from the
start. What is shared across strengths (an EWC Fisher) is the factory's to compute once.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustft.checks import as_real
from robustft.core.checkpoint import save_report
from robustft.core.params import select_parameters
from robustft.interpolation.wise_ft import (
    DEFAULT_ALPHAS,
    AlphaBudget,
    WiseFTCurve,
    WiseFTWeights,
    check_alphas,
    choose_alpha,
    metric_value,
    wise_ft_sweep,
)

__all__ = ["StrengthCurve", "check_strengths", "strength_sweep"]

WISE_FT_MODES = (None, "each", "chosen")


def check_strengths(strengths: Sequence[float]) -> list[float]:
    """The strength grid as sorted finite floats; empty, non-numeric or repeated values are a ValueError."""
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, Sequence) or not strengths:
        raise ValueError(f"strengths: expected a non-empty list of numbers, got {strengths!r}")
    values = []
    for s in strengths:
        real = as_real(s)
        if real is None:
            raise ValueError(f"strengths: {s!r} is not a real number")
        v = float(real)
        if not math.isfinite(v):
            raise ValueError(f"strengths: {s!r} is not finite")
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"strengths: repeated values in {list(strengths)!r}; each is one training run")
    return sorted(values)


@dataclass
class StrengthCurve:
    """Metric of every eval set for every strength's run, and the strength chosen on the ID set.

    ``curve`` is a :class:`WiseFTCurve` whose ``alphas`` are the strengths and ``axis`` their name (its table,
    CSV and plot are reused); its ``results`` hold each run's end point, or with WiSE-FT on each run its θ(α*)
    (``alphas[i]``, chosen on the ID set). ``wise_ft`` holds the α curves (as dicts) by strength,
    ``train_seconds`` each run's ``train()``, ``id_loss`` the ID loss that breaks ties.
    """

    curve: WiseFTCurve
    alphas: list[float | None] = field(default_factory=list)
    wise_ft: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)
    id_loss: list[float] = field(default_factory=list)
    trainer: Any = field(default=None, repr=False, compare=False)  # the chosen run's Trainer (not saved)

    @property
    def strengths(self) -> list[float]:
        return self.curve.alphas

    @property
    def results(self) -> dict[str, list[float]]:
        return self.curve.results

    @property
    def chosen_strength(self) -> float:
        return self.curve.chosen_alpha

    def value(self, dataset: str, strength: float) -> float:
        """The metric of ``dataset`` for the run at ``strength``."""
        return self.curve.value(dataset, strength)

    def as_dict(self) -> dict[str, Any]:
        """Everything but the Trainer, under the strength's own keys (``strengths``, ``chosen_strength``);
        with a budget also the rule, the budget, its metric per run, the start's value and the limit."""
        c = self.curve
        out = {"axis": c.axis, "strengths": c.alphas, "results": c.results, "metric": c.metric,
               "id_dataset": c.id_dataset, "chosen_strength": c.chosen_alpha,
               "greater_is_better": c.greater_is_better, "alphas": self.alphas, "wise_ft": self.wise_ft,
               "train_seconds": self.train_seconds, "id_loss": self.id_loss, "rule": c.rule}
        if c.budget is not None:
            out.update(budget=asdict(c.budget), constraint=c.constraint, budget_start=c.budget_start,
                       budget_limit=c.budget_limit, id_rule_strength=c.extra.get("id_rule_alpha"))
        return out

    def to_json(self) -> str:
        """The JSON of :meth:`as_dict`."""
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        text = self.curve.to_csv()
        if not any(a is not None for a in self.alphas):
            return text
        lines = text.splitlines()  # one more column: each run's α*
        lines = [lines[0] + ",alpha"] + [f"{row},{a}" for row, a in zip(lines[1:], self.alphas, strict=True)]
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        """Plain-text table, one row per strength (with each run's α* when WiSE-FT ran on every run)."""
        text = self.curve.table()
        if not any(a is not None for a in self.alphas):
            return text
        lines = text.splitlines()
        top, rows = lines[: -len(self.alphas)], lines[-len(self.alphas):]  # (budget rule,) header, rule
        rows = [row if a is None else f"{row}  (α*={a:g})" for row, a in zip(rows, self.alphas, strict=True)]
        return "\n".join([*top, *rows])

    def plot(self, path: str | os.PathLike) -> Path | None:
        """The WiSE-FT-style plot: ID metric on x, each shifted metric on y, one point per strength."""
        return self.curve.plot(path)

    def save(self, output_dir: str | os.PathLike, plot: bool = True, stem: str = "strength") -> list[Path]:
        """Write ``<stem>.json``, ``.csv`` and (with matplotlib) ``.png`` atomically; returns the paths."""
        return save_report(output_dir, stem, self.to_json(), self.to_csv(), self.plot if plot else None)


def _as_callbacks(made: Any, strength: float) -> list:
    """The factory's result as a list of callbacks (one callback, or a list/tuple of them)."""
    callbacks = list(made) if isinstance(made, (list, tuple)) else [made]
    for cb in callbacks:
        if not hasattr(cb, "on_train_begin"):
            raise TypeError(f"make_callback({strength:g}) returned {type(cb).__name__}, not a callback")
    return callbacks


def _evaluate_end(trainer, eval_datasets: Mapping[str, Any], id_dataset: str, metric: str, prefix: str,
                  budget: AlphaBudget | None = None) -> tuple[dict[str, float], float, float]:
    """Every eval set's metric for the model as it is, the ID loss (nan when not reported) and the budget's
    metric on its set (nan without a budget)."""
    scores, loss, constraint = {}, math.nan, math.nan
    for name, ds in eval_datasets.items():
        key = f"{prefix}_{name}"
        metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=key)
        scores[name] = metric_value(metrics, key, metric, name)
        if name == id_dataset:
            loss = float(metrics.get(f"{key}_loss", math.nan))
        if budget is not None and name == budget.dataset:
            constraint = metric_value(metrics, key, budget.metric, name)
    return scores, loss, constraint


def _start_value(trainer, eval_datasets: Mapping[str, Any], budget: AlphaBudget, prefix: str) -> float:
    """The budget's metric of the untrained start model (a fresh Trainer before ``train()``)."""
    key = f"{prefix}_start_{budget.dataset}"
    metrics = trainer.evaluate(eval_dataset=eval_datasets[budget.dataset], metric_key_prefix=key)
    return metric_value(metrics, key, budget.metric, budget.dataset)


def _choose(grid: Sequence[float], results: Sequence[float], greater_is_better: bool,
            tie: Sequence[float] | None, budget: AlphaBudget | None, constraint: Sequence[float],
            start: float | None) -> float:
    """The strength :func:`choose_alpha` picks (under the budget, measured from the start's value)."""
    if budget is None:
        return choose_alpha(grid, results, greater_is_better, tie_break=tie)
    return choose_alpha(grid, results, greater_is_better, tie_break=tie, constraint=constraint, budget=budget,
                        base=start)


def strength_sweep(
    make_trainer: Callable[[list], Any],
    make_callback: Callable[[float], Any],
    strengths: Sequence[float],
    eval_datasets: Mapping[str, Any],
    id_dataset: str,
    metric: str = "accuracy",
    greater_is_better: bool = True,
    name: str = "strength",
    wise_ft: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    output_dir: str | os.PathLike | None = None,
    plot: bool = True,
    budget: AlphaBudget | Mapping[str, Any] | None = None,
) -> StrengthCurve:
    """Train ``make_trainer(make_callback(s))`` for each strength s; choose s on ``id_dataset`` only.

    ``make_trainer(callbacks)`` returns a fresh ``Trainer`` on a fresh copy of the start model with those
    callbacks; ``make_callback(s)`` returns the callback (or a list) for strength s; both factories are called
    for every strength before any training, so a bad strength fails first. Each run is scored with
    ``trainer.evaluate`` on every eval set (``metric`` from the Trainer's ``compute_metrics``). ``wise_ft``:
    ``"each"`` sweeps α (``alphas``) on every run's end point and scores each run at its α* (chosen on ID),
    ``"chosen"`` sweeps α on the chosen run only. The chosen run's Trainer is kept (``curve.trainer``; its
    model at θ(α*) with WiSE-FT); the others are dropped. ``output_dir``: the JSON, CSV and plot saved there.

    ``budget`` (an :class:`~robustft.interpolation.wise_ft.AlphaBudget` or a mapping of its fields, its set
    among ``eval_datasets``): the best ID metric among the strengths whose run keeps the budget's metric
    within ε of the start model's (measured once, on the first Trainer before it trains), by
    :func:`~robustft.interpolation.wise_ft.choose_alpha`, the α rule itself. No admissible strength: the
    one closest to the budget (smallest violation), with a RuntimeWarning naming the budget. With WiSE-FT the
    α sweeps choose under the same budget (α=0 is the same start model).
    """
    grid = check_strengths(strengths)
    if not callable(make_trainer) or not callable(make_callback):
        raise TypeError("make_trainer and make_callback must be callables (callbacks -> Trainer, strength -> "
                        "callback)")
    if id_dataset not in eval_datasets:
        raise ValueError(f"id_dataset: {id_dataset!r} is not one of the eval sets {sorted(eval_datasets)}")
    if wise_ft not in WISE_FT_MODES:
        raise ValueError(f"wise_ft: expected one of {WISE_FT_MODES}, got {wise_ft!r}")
    alpha_grid = check_alphas(alphas) if wise_ft else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string (the swept quantity), got {name!r}")
    if budget is not None:
        budget = AlphaBudget.of(budget)
        if budget.dataset not in eval_datasets:
            raise ValueError(f"budget.dataset: {budget.dataset!r} is not one of the eval sets "
                             f"{sorted(eval_datasets)}")
        if alpha_grid is not None and 0.0 not in alpha_grid:
            raise ValueError(f"budget: WiSE-FT's α sweeps measure it from α=0, which alphas {alpha_grid} "
                             "lack; add 0")
    callbacks = [_as_callbacks(make_callback(s), s) for s in grid]

    results: dict[str, list[float]] = {d: [] for d in eval_datasets}
    id_loss, seconds, chosen_alphas, curves, constraint, start = [], [], [], {}, [], None
    best: tuple[int, Any, WiseFTWeights | None] | None = None
    for i, s in enumerate(grid):
        trainer = make_trainer(list(callbacks[i]))
        if budget is not None and start is None:
            start = _start_value(trainer, eval_datasets, budget, name)
        weights = WiseFTWeights(select_parameters(trainer.model), model=trainer.model) if wise_ft else None
        t0 = time.perf_counter()
        trainer.train()
        seconds.append(time.perf_counter() - t0)
        alpha = None
        if wise_ft == "each":
            wise = wise_ft_sweep(trainer, weights, eval_datasets, id_dataset, alpha_grid, metric,
                                 greater_is_better, progress=False, key_prefix=f"{name}{s:g}_wise_ft",
                                 budget=budget)
            curves[f"{s:g}"] = wise.as_dict()
            alpha = wise.chosen_alpha
            scores = {d: wise.value(d, alpha) for d in eval_datasets}
            losses = wise.extra["id_loss"]
            loss = losses[wise.alphas.index(alpha)] if len(losses) == len(wise.alphas) else math.nan
            held = wise.constraint[wise.alphas.index(alpha)] if budget is not None else math.nan
        else:
            scores, loss, held = _evaluate_end(trainer, eval_datasets, id_dataset, metric, f"{name}{s:g}",
                                               budget)
        for d in eval_datasets:
            results[d].append(scores[d])
        id_loss.append(loss)
        chosen_alphas.append(alpha)
        constraint.append(held)
        tie = id_loss if metric.removeprefix("eval_") != "loss" else None
        with warnings.catch_warnings():  # the final choice below warns once
            warnings.simplefilter("ignore")
            so_far = _choose(grid[: i + 1], results[id_dataset], greater_is_better, tie, budget, constraint,
                             start)
        if so_far == s:  # keep only the best run so far (its model, and its start when WiSE-FT follows)
            best = (i, trainer, weights)
        del trainer, weights
    tie = id_loss if metric.removeprefix("eval_") != "loss" else None
    chosen = _choose(grid, results[id_dataset], greater_is_better, tie, budget, constraint, start)
    if best is None or grid[best[0]] != chosen:  # the prefix choice and the full one follow the same order
        raise RuntimeError(f"strength_sweep: kept the run at {best and grid[best[0]]}, chose {chosen}")
    _, trainer, weights = best
    if wise_ft == "chosen":
        wise = wise_ft_sweep(trainer, weights, eval_datasets, id_dataset, alpha_grid, metric,
                             greater_is_better, progress=False, key_prefix=f"{name}{chosen:g}_wise_ft",
                             budget=budget)
        curves[f"{chosen:g}"] = wise.as_dict()
    table = WiseFTCurve(alphas=grid, results=results, metric=metric, id_dataset=id_dataset,
                        chosen_alpha=chosen, greater_is_better=greater_is_better, axis=name, budget=budget,
                        constraint=constraint if budget is not None else None, budget_start=start)
    if budget is not None:
        table.extra["id_rule_alpha"] = _choose(grid, results[id_dataset], greater_is_better, tie, None, [],
                                               None)
    curve = StrengthCurve(table, alphas=chosen_alphas, wise_ft=curves, train_seconds=seconds, id_loss=id_loss,
                          trainer=trainer)
    if output_dir is not None:
        curve.save(output_dir, plot=plot)
    return curve
