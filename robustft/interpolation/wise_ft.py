"""WiSE-FT outside the callback: interpolating models and state dicts, sweeps of α, and the curve.

WiSE-FT (Wortsman et al., 2022, arXiv:2109.01903) ensembles the zero-shot/pre-trained and the
fine-tuned weights: θ(α) = (1−α)·θ_start + α·θ_end, with α chosen on in-distribution data.

- :func:`interpolate_state_dicts` / :func:`interpolate_models`: offline, over whole models.
- :class:`WiseFTWeights`: the start of the trained tensors of a live model and how to set θ(α)
  (with the exact LoRA rule: the delta B·A is scaled, not the factors interpolated).
- :func:`wise_ft_sweep`: every α on every eval set through ``trainer.evaluate``; α is chosen on
  the in-distribution set only, optionally under an :class:`AlphaBudget` (a constraint metric on another
  set, e.g. the retained loss, at most ε worse than at α=0); returns a :class:`WiseFTCurve` (table, JSON,
  CSV, PNG plot).
- :func:`evaluate_at_alphas`: the one loop behind the sweep and DaWin: θ(α) written once per α into
  the live tensors, something run, the end weights restored (also on error).

DaWin (per-input α, one interpolation per Beta-mixture component) is in :mod:`robustft.interpolation.dawin`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from robustft.checks import check_bool, check_non_negative
from robustft.core import distributed
from robustft.core.checkpoint import pyplot, save_figure, save_report
from robustft.core.params import Snapshot, full_shape, is_sharded, live_tensors, restored, select_parameters
from robustft.lora.layers import is_lora_b, lora_a_name
from robustft.ops.interpolate import (
    check_alpha,
    check_method,
    interpolate,
    interpolate_end_,
    interpolate_into_,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "AlphaBudget",
    "WiseFTCurve",
    "WiseFTWeights",
    "budget_base",
    "check_alphas",
    "check_budget",
    "choose_alpha",
    "evaluate_at_alphas",
    "interpolate_models",
    "interpolate_state_dicts",
    "metric_value",
    "wise_ft_sweep",
]

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

R = TypeVar("R")


def check_alphas(alphas: Sequence[float], extrapolate: bool = False) -> list[float]:
    """The α grid as sorted unique floats, each checked by :func:`check_alpha`."""
    if isinstance(alphas, (str, bytes)) or not len(alphas):
        raise ValueError(f"alphas: expected a non-empty list of numbers, got {alphas!r}")
    return sorted({check_alpha(a, extrapolate, name="alphas") for a in alphas})


@dataclass(frozen=True)
class AlphaBudget:
    """Admit only the α whose ``metric`` on eval set ``dataset`` is at most ε worse than at α=0 (the start).

    The limit is value(α=0) + ``epsilon`` + ``relative``·|value(α=0)| for a metric where lower is better
    (a loss, a KL: the default), value(α=0) − the same slack where greater is better (an accuracy).
    ``metric`` is any key the sweep's evaluation of ``dataset`` returns (``"loss"``: the Trainer's eval
    loss, e.g. of the base model's own answers, the "retained" loss); the grid must hold α=0.
    """

    dataset: str
    metric: str = "loss"
    epsilon: float = 0.0
    relative: float = 0.0
    greater_is_better: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"budget.dataset must name an eval dataset, got {self.dataset!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"budget.metric must be the name of an evaluation metric, got {self.metric!r}")
        object.__setattr__(self, "metric", self.metric.removeprefix("eval_"))
        object.__setattr__(self, "epsilon", check_non_negative("budget.epsilon", self.epsilon))
        object.__setattr__(self, "relative", check_non_negative("budget.relative", self.relative))
        check_bool("budget.greater_is_better", self.greater_is_better)

    @classmethod
    def of(cls, value: AlphaBudget | Mapping[str, Any]) -> AlphaBudget:
        """An AlphaBudget, or one built from a mapping of its fields (a config file's ``budget:``)."""
        if isinstance(value, AlphaBudget):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                known = [f.name for f in fields(cls)]
                raise ValueError(f"budget: unknown keys {sorted(unknown)}; known: {known}")
            return cls(**value)
        raise ValueError(f"budget must be an AlphaBudget or a mapping of its fields, got {value!r}")

    def limit(self, base: float) -> float:
        """The worst admitted value, given the value at α=0."""
        slack = self.epsilon + self.relative * abs(base)
        return base - slack if self.greater_is_better else base + slack

    def excess(self, value: float, base: float) -> float:
        """How far ``value`` is past the limit (≤ 0: admitted; +inf when not finite)."""
        if not math.isfinite(value):
            return math.inf
        over = value - self.limit(base)
        return -over if self.greater_is_better else over

    def describe(self, base: float | None = None, at: str = "at alpha=0") -> str:
        """``retained loss <= value at alpha=0 + 0.1 (= 0.71)``: the rule in words (tables, warnings);
        ``at`` names where the base value was measured (a strength sweep: ``"of the start model"``)."""
        sign, op = ("-", ">=") if self.greater_is_better else ("+", "<=")
        parts = [f"{self.epsilon:g}"] if self.epsilon or not self.relative else []
        if self.relative:
            parts.append(f"{self.relative:g}*|value {at}|")
        text = f"{self.dataset} {self.metric} {op} value {at} {sign} {' + '.join(parts)}"
        return text if base is None else f"{text} (= {self.limit(base):.4g})"


def choose_alpha(
    alphas: Sequence[float],
    values: Sequence[float],
    greater_is_better: bool = True,
    tie_break: Sequence[float] | None = None,
    constraint: Sequence[float] | None = None,
    budget: AlphaBudget | None = None,
    base: float | None = None,
) -> float:
    """α* = argbest_α metric_ID(α); ties go to the lowest ``tie_break`` (ID loss), then the smallest α.

    Only in-distribution numbers are passed in, so a shifted set can never steer the choice. A
    metric like accuracy is often flat over a range of α on a finite validation set; the ID loss
    of the same evaluations separates those models, and the smallest α (closest to the start) is the
    last resort. A non-finite value (a diverged evaluation) is never chosen: it is reported with a
    warning, and a curve with no finite value is an error.

    With a ``budget`` (and its metric at every α in ``constraint``) only the α it admits compete: the best
    ID metric subject to constraint(α) within ε of constraint(α=0). α=0 always meets its own budget; if its
    ID value is not finite either, α=0 is returned with a RuntimeWarning naming the budget and the smallest
    violation. ``base``: the constraint's value at a start the grid does not hold (a strength sweep's
    untrained model, :func:`robustft.analysis.strength.strength_sweep`); the limit is measured from it, and
    when no point is admitted the one with the smallest violation is returned (ties as above), with the
    same warning: the fallback of both cases is the point closest to meeting the budget (α=0 always meets
    its own).
    """
    if len(alphas) != len(values) or not alphas:
        raise ValueError(f"choose_alpha: {len(alphas)} alphas for {len(values)} metric values")
    if tie_break is not None and len(tie_break) != len(alphas):
        raise ValueError(f"choose_alpha: {len(tie_break)} tie-break values for {len(alphas)} alphas")
    if (budget is None) != (constraint is None):
        raise ValueError("choose_alpha: give both a budget and its constraint values, or neither")
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        raise ValueError(f"choose_alpha: no finite metric value at any α ({list(values)}); nothing to choose")
    if len(finite) < len(values):
        skipped = [alphas[i] for i in range(len(values)) if i not in finite]
        warnings.warn(f"choose_alpha: the metric is not finite at α={skipped}; those points are never chosen",
                      RuntimeWarning, stacklevel=2)
    if budget is not None:
        outside = base is not None
        base = budget_base(alphas, constraint, budget, base)
        excess = [budget.excess(c, base) for c in constraint]
        admitted = [i for i in finite if excess[i] <= 0]
        if not admitted:
            worst = min(excess[i] for i in finite)
            least = [i for i in finite if excess[i] == worst]
            at = "of the start model" if outside else "at alpha=0"
            warnings.warn(f"choose_alpha: no {'point' if outside else 'α'} with a finite metric meets the "
                          f"budget {budget.describe(base, at)}; the smallest violation is {worst:.4g} (at "
                          f"{'' if outside else 'α='}{[alphas[i] for i in least]}); choosing "
                          + ("the one closest to the budget" if outside else "α=0 (the start)"),
                          RuntimeWarning, stacklevel=2)
            if not outside:
                return 0.0
            finite = least
        else:
            finite = admitted
    sign = 1.0 if greater_is_better else -1.0
    best = max(sign * values[i] for i in finite)
    tied = [i for i in finite if sign * values[i] == best]
    if tie_break is not None and any(math.isfinite(tie_break[i]) for i in tied):
        low = min(tie_break[i] for i in tied if math.isfinite(tie_break[i]))
        tied = [i for i in tied if tie_break[i] == low]
    return min(alphas[i] for i in tied)


def budget_base(alphas: Sequence[float], constraint: Sequence[float], budget: AlphaBudget,
                start: float | None = None) -> float:
    """The constraint's value at α=0 (or ``start``, measured off the grid), which the budget is measured
    from; a ValueError when there is none."""
    if len(constraint) != len(alphas):
        raise ValueError(f"choose_alpha: {len(constraint)} constraint values for {len(alphas)} alphas")
    if start is not None:
        if not math.isfinite(start):
            raise ValueError(f"budget: {budget.dataset} {budget.metric} of the start model is {start}; "
                             "no budget from it")
        return float(start)
    if 0.0 not in alphas:
        raise ValueError(f"budget: the limit is measured from α=0, which the grid {list(alphas)} lacks; "
                         "add 0")
    base = float(constraint[list(alphas).index(0.0)])
    if not math.isfinite(base):
        raise ValueError(f"budget: {budget.dataset} {budget.metric} at α=0 is {base}; no budget from it")
    return base


# -- offline, whole models ---------------------------------------------------------------------
def interpolate_state_dicts(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
) -> dict[str, torch.Tensor]:
    """θ(α) for every floating tensor of two state dicts; integer tensors must be equal and are kept.

    The same :func:`robustft.ops.interpolate.interpolate` as the callback, ``robustft interpolate`` and
    merge recipes (identical bits). Different keys or shapes are a ValueError naming the tensor.
    """
    out = interpolate(dict(start), dict(end), alpha, method, extrapolate)
    return {k: out[k] for k in end}


def interpolate_models(
    start: nn.Module,
    end: nn.Module,
    alpha: float,
    method: str = "linear",
    extrapolate: bool = False,
    into: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """θ(α) of two models' state dicts; loaded into ``into`` (strictly) when given; returns the state dict."""
    sd = interpolate_state_dicts(start.state_dict(), end.state_dict(), alpha, method, extrapolate)
    if into is not None:
        into.load_state_dict(sd, strict=True)
    return sd


# -- a live model being fine-tuned -------------------------------------------------------------
class WiseFTWeights:
    """Start point of the trained tensors of a live model, and θ(α) written into it.

    ``params`` is the name->parameter selection (``select_parameters``). LoRA factor pairs are
    recognised by name (``...lora_B.<adapter>...`` with its ``lora_A`` partner): WiSE-FT of a LoRA
    model interpolates the merged weights, W(α) = W0 + α·B·A when B starts at 0, which is exactly
    B ← α·B_end with A kept at its end value (interpolating A and B each would give α²·B·A + ...).
    Nothing is stored for the factors. A non-zero B at start (PiSSA/OLoRA/LoftQ inits, or a trained
    adapter) has no rank-r θ(α) and is refused. Every other tensor gets a snapshot (``device``).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        device: str | torch.device = "same",
        check_start: bool = True,
        model: nn.Module | None = None,
    ):
        self.params = dict(params)
        self.model = model  # resharded after every write (FSDP2), see distributed.reshard
        names = list(self.params)
        self.lora_b = [n for n in names if is_lora_b(n)]
        partners = {lora_a_name(b) for b in self.lora_b}
        self.lora_a = [n for n in names if n in partners]
        factor = set(self.lora_b) | set(self.lora_a)
        self.dense = [n for n in names if n not in factor]
        if check_start:  # False on resume: the live B is trained, the start is loaded from the checkpoint
            self._check_zero_delta()
        self.start = Snapshot.of({n: self.params[n] for n in self.dense}, device=device)
        self.device = device

    @classmethod
    def from_models(
        cls,
        start: nn.Module,
        end: nn.Module,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        device: str | torch.device = "same",
    ) -> WiseFTWeights:
        """Two models in memory (e.g. loaded from saved checkpoints): θ(α) is written into ``end``'s tensors.

        Every floating parameter and buffer (as :func:`interpolate_models`, which also interpolates buffers)
        is selected in both models by name; the start values are copied once (``device``), ``start`` itself
        is never written. Different names or shapes are a ValueError naming the tensor.
        """
        kw = dict(include=include, exclude=exclude, trainable_only=False, buffers=True)
        start_params = select_parameters(start, **kw)
        end_params = select_parameters(end, **kw)
        if list(start_params) != list(end_params):
            only_s = sorted(set(start_params) - set(end_params))
            only_e = sorted(set(end_params) - set(start_params))
            raise ValueError(f"start and end models select different tensors: only in start {only_s[:5]}, "
                             f"only in end {only_e[:5]}")
        for name, t in start_params.items():
            if tuple(full_shape(t)) != tuple(full_shape(end_params[name])):
                raise ValueError(f"tensor {name!r}: start has shape {tuple(full_shape(t))}, end has shape "
                                 f"{tuple(full_shape(end_params[name]))}")
        weights = cls(start_params, device=device)  # start snapshot (and the zero-delta check of LoRA B)
        weights.params = dict(end_params)
        return weights

    def _check_zero_delta(self) -> None:
        sharded = is_sharded(self.params)
        for n in self.lora_b:
            nonzero = live_tensors({n: self.params[n]})[0].count_nonzero().reshape(1)
            if sharded:  # every rank decides on the whole factor, so all raise together (no hang)
                nonzero = distributed.all_reduce_sum(nonzero)
            if nonzero.item():
                raise ValueError(
                    f"WiSE-FT: LoRA factor {n!r} is non-zero at the start of training, so the "
                    "adapter's initial delta B·A is not zero (PiSSA/OLoRA/LoftQ-style init, or a trained "
                    "adapter). "
                    "θ(α) would need rank 2r and such inits also change the base weights. Use the default "
                    "LoRA init (init_lora_weights=True), or merge the adapter (merge_and_unload) and "
                    "fine-tune a new one."
                )

    def stored_numel(self) -> int:
        return self.start.numel()

    def _dense_params(self) -> dict[str, torch.Tensor]:
        return {n: self.params[n] for n in self.dense}

    def capture_end(self) -> Snapshot:
        """A copy of the current (fine-tuned) values of every selected tensor, for sweeps."""
        return Snapshot.of(self.params, device=self.device)

    @torch.no_grad()
    def apply_(
        self, alpha: float, method: str = "linear", end: Snapshot | None = None, extrapolate: bool = False
    ) -> None:
        """Write θ(α) into the live tensors: from ``end`` when given, else from their current values.

        Without ``end`` the live values are taken as θ_end (call once, at the end of training).
        """
        alpha = check_alpha(alpha, extrapolate)
        check_method(method)
        dense_live = live_tensors(self._dense_params())
        # SLERP's angle is that of the whole tensor: on FSDP2 shards its dot products are summed over ranks
        reduce = distributed.all_reduce_sum if is_sharded(self.params) else None
        if end is None:
            interpolate_end_(dense_live, self.start.tensors, alpha, method, extrapolate, reduce=reduce)
            for n in self.lora_b:
                live_tensors({n: self.params[n]})[0].mul_(alpha)
            distributed.reshard(self.model)
            return
        ends = dict(zip(end.names, end.tensors, strict=True))
        interpolate_into_(
            dense_live, self.start.tensors, [ends[n] for n in self.dense], alpha, method, extrapolate,
            reduce=reduce,
        )
        for n in self.lora_a:
            live_tensors({n: self.params[n]})[0].copy_(ends[n])
        for n in self.lora_b:
            b = live_tensors({n: self.params[n]})[0]
            b.copy_(ends[n])
            b.mul_(alpha)
        distributed.reshard(self.model)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.start.state_dict(prefix="start."), {"dense": self.dense, "lora_b": self.lora_b}

    def load_state_dict(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], source: str
    ) -> None:
        if list(meta.get("dense", [])) != self.dense:
            raise ValueError(
                f"{source}: saved WiSE-FT start covers other tensors than the selected parameters"
            )
        self.start.load_state_dict(tensors, prefix="start.", source=source)


# -- the curve ---------------------------------------------------------------------------------
@dataclass
class WiseFTCurve:
    """Metric of every eval set at every α, and the α chosen on the in-distribution set (under ``budget``).

    ``budget`` and ``constraint`` (its metric on its set at every α) are set when α was chosen under an
    :class:`AlphaBudget`; ``extra["id_rule_alpha"]`` then holds what the ID-only rule would have chosen.
    """

    alphas: list[float]
    results: dict[str, list[float]]
    metric: str
    id_dataset: str
    chosen_alpha: float
    greater_is_better: bool = True
    method: str = "linear"
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    budget: AlphaBudget | None = None
    constraint: list[float] | None = None
    axis: str = "alpha"  # what ``alphas`` hold: WiSE-FT's α, or a swept strength (robustft.analysis.strength)
    budget_start: float | None = None  # the budget's metric of the start when the grid lacks it (strengths)

    @property
    def shifted(self) -> list[str]:
        return [d for d in self.results if d != self.id_dataset]

    @property
    def rule(self) -> str:
        """``"id"`` (best in-distribution metric) or ``"budget"`` (the same among the α the budget admits)."""
        return "id" if self.budget is None else "budget"

    @property
    def budget_limit(self) -> float | None:
        """The worst constraint value the budget admits (None without a budget)."""
        if self.budget is None:
            return None
        return self.budget.limit(budget_base(self.alphas, self.constraint, self.budget, self.budget_start))

    @property
    def budget_at(self) -> str:
        """Where the budget's base value was measured, in words (tables, plots)."""
        return "at alpha=0" if self.budget_start is None else "of the start model"

    def value(self, dataset: str, alpha: float) -> float:
        return self.results[dataset][self.alphas.index(alpha)]

    def constraint_values(self, budget: AlphaBudget) -> list[float]:
        """The budget's metric at every α: measured with the curve, or the curve's own metric on its set."""
        if self.budget is not None and (self.budget.dataset, self.budget.metric) == (budget.dataset,
                                                                                     budget.metric):
            return list(self.constraint)
        if budget.metric == self.metric.removeprefix("eval_") and budget.dataset in self.results:
            return list(self.results[budget.dataset])
        raise ValueError(f"budget: the curve holds no {budget.metric!r} of {budget.dataset!r} (it measured "
                         f"{self.metric!r} on {sorted(self.results)}); sweep with this budget instead")

    def choose(self, budget: AlphaBudget | None = None) -> float:
        """α* of this curve by the ID rule, or under ``budget`` (read from what the curve measured)."""
        id_loss = self.extra.get("id_loss") or []
        by_loss = len(id_loss) == len(self.alphas) and self.metric.removeprefix("eval_") != "loss"
        tie = id_loss if by_loss else None
        constraint = None if budget is None else self.constraint_values(budget)
        return choose_alpha(self.alphas, self.results[self.id_dataset], self.greater_is_better, tie,
                            constraint=constraint, budget=budget, base=self.budget_start)

    def admitted(self, alpha: float) -> bool:
        """Whether the curve's budget admits ``alpha`` (always True without one)."""
        if self.budget is None:
            return True
        base = budget_base(self.alphas, self.constraint, self.budget, self.budget_start)
        return self.budget.excess(self.constraint[self.alphas.index(alpha)], base) <= 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rule"] = self.rule
        if self.budget is not None:
            out["budget_limit"] = self.budget_limit
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        budget = [] if self.budget is None else [f"budget_{self.budget.dataset}_{self.budget.metric}",
                                                  "admitted"]
        w.writerow([self.axis, *[f"{d}_{self.metric}" for d in self.results], "chosen", *budget])
        for i, a in enumerate(self.alphas):
            row = [a, *[self.results[d][i] for d in self.results], int(a == self.chosen_alpha)]
            if self.budget is not None:
                row += [self.constraint[i], int(self.admitted(a))]
            w.writerow(row)
        return buf.getvalue()

    def table(self) -> str:
        """Plain-text table: one row per α, the endpoints, the chosen α and the budget's verdicts labelled."""
        names = list(self.results)
        own = self.budget is not None and self.budget.metric == self.metric.removeprefix("eval_") and \
            self.budget.dataset in self.results
        extra = [] if self.budget is None or own else [f"{self.budget.dataset} {self.budget.metric}"]
        head = f"{self.axis:>7} " + " ".join(f"{d[:14]:>14}" for d in [*names, *extra]) + "  note"
        rows = [head, "-" * len(head)]
        if self.budget is not None:
            base = budget_base(self.alphas, self.constraint, self.budget, self.budget_start)
            rule = (f"rule: best {self.id_dataset} {self.metric} subject to "
                    f"{self.budget.describe(base, self.budget_at)}")
            rows.insert(0, rule)
        for i, a in enumerate(self.alphas):
            notes = []
            if a == 0.0 and self.axis == "alpha":
                notes.append("start")
            if a == 1.0 and self.axis == "alpha":
                notes.append("fine-tuned")
            if a == self.chosen_alpha:
                notes.append(f"<- chosen on {self.id_dataset}" + (" under the budget" if self.budget else ""))
            if not math.isfinite(self.results[self.id_dataset][i]):
                notes.append("not finite: never chosen")
            if not self.admitted(a):
                notes.append("over budget")
            vals = " ".join(f"{self.results[d][i]:>14.4f}" for d in names)
            if extra:
                vals += f" {self.constraint[i]:>14.4f}"
            x = f"{a:>7.2f}" if self.axis == "alpha" else f"{a:>7.3g}"
            rows.append(f"{x} {vals}  {', '.join(notes)}")
        return "\n".join(rows)

    def save(self, output_dir: str | os.PathLike, plot: bool = True, stem: str = "wise_ft") -> list[Path]:
        """Write ``<stem>.json``, ``.csv`` and (with matplotlib) ``.png`` atomically; returns the paths."""
        return save_report(output_dir, stem, self.to_json(), self.to_csv(), self.plot if plot else None)

    def plot(self, path: str | os.PathLike) -> Path | None:
        """WiSE-FT-style plot: ID metric on x, each shifted metric on y, one point per α; with a budget, a
        second panel: the constraint metric against α, the budget's limit dashed."""
        plt = pyplot()
        if plt is None:
            return None
        if self.budget is None:
            fig, ax = plt.subplots(figsize=(5.5, 4.5))
        else:
            fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 4.5))
            self._plot_budget(bx)
        x = self.results[self.id_dataset]
        ci = self.alphas.index(self.chosen_alpha)
        wise, sym = self.axis == "alpha", "α" if self.axis == "alpha" else self.axis
        for d in self.shifted or [self.id_dataset]:
            y = self.results[d]
            ax.plot(x, y, "o-", ms=4, label=f"{d}: {'WiSE-FT' if wise else 'one run each'}, {sym} ∈ "
                    f"[{self.alphas[0]:g}, {self.alphas[-1]:g}]")
            for a, label, mk in ((0.0, "start", "s"), (1.0, "fine-tuned", "^")) if wise else ():
                if a in self.alphas:
                    i = self.alphas.index(a)
                    ax.plot(x[i], y[i], mk, ms=9, color="black")
                    ax.annotate(label, (x[i], y[i]), textcoords="offset points", xytext=(6, -10))
            ax.plot(x[ci], y[ci], "*", ms=16, color="crimson")
            ax.annotate(
                f"chosen {sym}={self.chosen_alpha:g}", (x[ci], y[ci]), textcoords="offset points",
                xytext=(6, 6),
            )
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel(f"{self.id_dataset} {self.metric} (in-distribution)")
        ax.set_ylabel(
            f"{self.metric} on the other eval sets" if self.shifted else f"{self.id_dataset} {self.metric}"
        )
        ax.set_title("WiSE-FT: weight-space ensembles of start and fine-tuned" if wise else f"{sym} sweep")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        return save_figure(fig, path)

    def _plot_budget(self, ax) -> None:
        """The budget panel: the constraint metric at every α, the limit, the admitted and chosen α."""
        b, y = self.budget, self.constraint
        ax.plot(self.alphas, y, "o-", ms=4, color="tab:purple", label=f"{b.dataset} {b.metric}")
        ax.axhline(self.budget_limit, ls="--", color="gray", label=f"budget: {b.describe(at=self.budget_at)}")
        over = [i for i, a in enumerate(self.alphas) if not self.admitted(a)]
        ax.plot([self.alphas[i] for i in over], [y[i] for i in over], "x", ms=9, color="gray",
                label="over budget: not eligible")
        ci = self.alphas.index(self.chosen_alpha)
        sym = "α" if self.axis == "alpha" else self.axis
        ax.plot(self.alphas[ci], y[ci], "*", ms=16, color="crimson",
                label=f"chosen {sym}={self.chosen_alpha:g}")
        id_alpha = self.extra.get("id_rule_alpha")
        if id_alpha is not None and id_alpha != self.chosen_alpha:
            j = self.alphas.index(id_alpha)
            ax.plot(id_alpha, y[j], "D", ms=8, mfc="none", color="black", label=f"ID rule α={id_alpha:g}")
        ax.set_xlabel("α (0: start, 1: fine-tuned)" if self.axis == "alpha" else f"{sym} (one run each)")
        ax.set_ylabel(f"{b.dataset} {b.metric}")
        ax.set_title("the budget's constraint along the path")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")


# -- sweeps through the Trainer's own evaluation -----------------------------------------------
def _metric_key(prefix: str, metric: str) -> str:
    metric = metric[len("eval_") :] if metric.startswith("eval_") else metric
    return f"{prefix}_{metric}"


def evaluate_at_alphas(
    weights: WiseFTWeights,
    alphas: Sequence[float],
    run: Callable[[int], R],
    method: str = "linear",
    extrapolate: bool = False,
) -> list[R]:
    """[run(i) with the model at θ(α_i)] for each α_i: one interpolation per α, never a model copy.

    θ(α_i) is written into the live tensors (:meth:`WiseFTWeights.apply_`, i.e. ``lerp(..., out=live)``)
    and ``run(i)`` evaluates whatever inputs belong to α_i (a whole eval set in a sweep, one mixture
    component's inputs in DaWin). The live values (θ_end) are kept aside once
    (:func:`robustft.core.params.restored`) and put back bit-exactly afterwards, also when ``run`` raises.
    """
    grid = [check_alpha(a, extrapolate, name="alphas") for a in alphas]
    check_method(method)
    end = weights.capture_end()
    try:
        with restored(weights.params, end):  # the end values back on exit, from ``end`` (no further copy)
            results = []
            for i, alpha in enumerate(grid):
                weights.apply_(alpha, method, end=end, extrapolate=extrapolate)
                results.append(run(i))
    finally:
        distributed.reshard(weights.model)
    return results


def metric_value(metrics: Mapping[str, float], prefix: str, metric: str, name: str) -> float:
    """``metric`` of eval set ``name`` in ``trainer.evaluate``'s results; missing: an error naming it."""
    key = _metric_key(prefix, metric)
    if key not in metrics:
        # the Trainer calls compute_metrics (and reports a loss) only when the batches carry labels
        why = "give the Trainer a compute_metrics that returns it"
        if f"{prefix}_loss" not in metrics:
            why = "no loss either: does the set have labels? The Trainer scores a set only with labels"
        raise ValueError(
            f"metric: {metric!r} not in the evaluation results of {name!r} (keys: {sorted(metrics)}); {why}"
        )
    return float(metrics[key])


def wise_ft_sweep(
    trainer,
    weights: WiseFTWeights,
    eval_datasets: Mapping[str, Any],
    id_dataset: str,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    metric: str = "accuracy",
    greater_is_better: bool = True,
    method: str = "linear",
    extrapolate: bool = False,
    apply_alpha: float | None = None,
    progress: bool = True,
    key_prefix: str = "wise_ft",
    budget: AlphaBudget | Mapping[str, Any] | None = None,
) -> WiseFTCurve:
    """Evaluate θ(α) for every α on every eval set with ``trainer.evaluate``; choose α on ``id_dataset``.

    The Trainer's ``compute_metrics``, data collator, dataloaders and distributed evaluation are
    used as they are (``trainer.evaluate(eval_dataset=ds, metric_key_prefix=...)``). Afterwards
    the model holds θ(α*) (or θ(``apply_alpha``) when given); if an evaluation raises, the
    fine-tuned weights are put back before the error propagates. With a ``budget`` (an
    :class:`AlphaBudget` or a mapping of its fields) its metric is read from the same evaluations of its
    set and α* is the best ID metric among the α it admits (:func:`choose_alpha`).
    """
    if id_dataset not in eval_datasets:
        raise ValueError(
            f"id_dataset: {id_dataset!r} is not one of the eval datasets {sorted(eval_datasets)}"
        )
    grid = check_alphas(alphas, extrapolate)
    check_method(method)
    budget = None if budget is None else check_budget(budget, eval_datasets, grid)
    results: dict[str, list[float]] = {name: [] for name in eval_datasets}
    id_loss: list[float] = []
    constraint: list[float] = []
    bar = None
    if progress and distributed.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid) * len(eval_datasets), desc="WiSE-FT sweep", unit="eval")

    def evaluate_all(i: int) -> None:
        alpha = grid[i]
        for name, ds in eval_datasets.items():
            prefix = f"{key_prefix}_a{alpha:g}_{name}"
            metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=prefix)
            results[name].append(metric_value(metrics, prefix, metric, name))
            if name == id_dataset and f"{prefix}_loss" in metrics:
                id_loss.append(float(metrics[f"{prefix}_loss"]))
            if budget is not None and name == budget.dataset:
                constraint.append(metric_value(metrics, prefix, budget.metric, name))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(alpha=alpha, **{name: round(results[name][-1], 4)})

    try:  # the fine-tuned weights are back after the sweep, also if an evaluation raises
        evaluate_at_alphas(weights, grid, evaluate_all, method, extrapolate)
    finally:
        if bar is not None:
            bar.close()
        curve = WiseFTCurve(
        alphas=grid,
        results=results,
        metric=metric,
        id_dataset=id_dataset,
        chosen_alpha=0.0,
        greater_is_better=greater_is_better,
        method=method,
        step=int(getattr(trainer.state, "global_step", 0)),
        extra={"id_loss": id_loss},
        budget=budget,
        constraint=constraint if budget is not None else None,
    )
    curve.chosen_alpha = curve.choose(budget)
    if budget is not None:
        curve.extra["id_rule_alpha"] = curve.choose()
    final = curve.chosen_alpha if apply_alpha is None else check_alpha(apply_alpha, extrapolate)
    curve.extra["applied_alpha"] = final
    weights.apply_(final, method, extrapolate=extrapolate)  # in place from the fine-tuned values
    return curve


def check_budget(
    budget: AlphaBudget | Mapping[str, Any], eval_datasets: Mapping[str, Any] | Sequence[str],
    alphas: Sequence[float],
) -> AlphaBudget:
    """``budget`` as an :class:`AlphaBudget` whose set is among ``eval_datasets`` and whose grid holds α=0."""
    budget = AlphaBudget.of(budget)
    if budget.dataset not in eval_datasets:
        raise ValueError(f"budget.dataset: {budget.dataset!r} is not one of the eval datasets "
                         f"{sorted(eval_datasets)}")
    if 0.0 not in alphas:
        raise ValueError(f"budget: the limit is measured from α=0, which the grid {list(alphas)} lacks; "
                         "add 0 to alphas")
    return budget
