"""The loss barrier between two models before and after Git Re-Basin alignment: a table, JSON and a plot.

Ainsworth et al., "Git Re-Basin" (ICLR 2023), Sec. 2 and 4: the loss along the linear path
θ(λ) = (1−λ)·θ_A + λ·π(θ_B) between model A and model B — unaligned (π the identity) and aligned by weight
matching and/or activation matching (:func:`robustft.merge.align.align_models`) — and its barrier,
max_λ L(θ(λ)) − ((1−λ)·L(θ_A) + λ·L(θ_B)) (:func:`robustft.ops.rebasin.loss_barrier`). Every variant has
the same end points (an aligned B computes B's function), so the curves differ only inside.

The models are run by ``torch.func.functional_call`` on θ(λ) (``robustft.core.model.call_with_weights``),
in eval mode, under ``no_grad``; their own weights are never written. BatchNorm statistics are interpolated
like the weights (the paper's REPAIR/reset of BatchNorm statistics is not done).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.core.checkpoint import pyplot, save_figure, save_report
from robustft.core.model import as_batches, call_with_weights
from robustft.core.params import train_mode
from robustft.merge.align import align_models
from robustft.ops.interpolate import check_alpha, interpolate
from robustft.ops.outputs import model_loss
from robustft.ops.rebasin import loss_barrier

__all__ = ["BarrierReport", "DEFAULT_LAMBDAS", "barrier_report", "loss_along_path", "plot_barrier"]

LossFn = Callable[[Any, Any], torch.Tensor]
DEFAULT_LAMBDAS = tuple(i / 10 for i in range(11))
METHODS = ("unaligned", "weight", "activation")


def _check_lambdas(lambdas: Iterable[float]) -> list[float]:
    grid = sorted({check_alpha(x, name="lambdas") for x in lambdas})
    if grid[:1] != [0.0] or grid[-1:] != [1.0]:
        raise ValueError(f"lambdas: must include 0 and 1 (the two models), got {grid}")
    return grid


def loss_along_path(
    model: nn.Module,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    data: Any,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    loss_fn: LossFn | None = None,
) -> list[float]:
    """L(θ(λ)) for each λ, θ(λ) = (1−λ)·a + λ·b (state dicts of ``model``'s architecture), the mean over
    the batches of ``data`` of each batch's loss (default: the output's own ``loss``)."""
    score = loss_fn or model_loss
    batches = as_batches(data)
    # each tensor once: functional_call refuses two values for tied weights (a state dict lists both names)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    a, b = {k: v for k, v in a.items() if k in names}, {k: v for k, v in b.items() if k in names}
    losses = []
    with train_mode(model, False), torch.no_grad():
        for lam in lambdas:
            weights = interpolate(a, b, lam)
            total = 0.0
            for batch in batches:
                loss = score(call_with_weights(model, weights, batch), batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn: must return the batch's loss as a scalar tensor")
                total += float(loss) / len(batches)
            losses.append(total)
    return losses


@dataclass
class BarrierReport:
    """Loss along θ(λ) from A (λ=0) to B (λ=1) per variant (``curves``), and each curve's barrier."""

    lambdas: list[float]
    curves: dict[str, list[float]]
    barriers: dict[str, float]
    moved: dict[str, int] = field(default_factory=dict)  # variant -> units not left in place
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Every field as JSON (λ grid, curves, barriers, units moved, options)."""
        return json.dumps(asdict(self), indent=2)

    def to_csv(self) -> str:
        """One row per variant: its barrier, then its loss at each λ."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["variant", "barrier"] + [f"{x:g}" for x in self.lambdas])
        for name, curve in self.curves.items():
            writer.writerow([name, repr(self.barriers[name])] + [repr(v) for v in curve])
        return buf.getvalue()

    def table(self) -> str:
        """The table as text: λ across, one row per variant, its barrier last."""
        width = max(len("λ"), *(len(n) for n in self.curves))
        rows = [f"{'λ':>{width}} " + " ".join(f"{x:>7.2f}" for x in self.lambdas) + "   barrier"]
        rows += [f"{n:>{width}} " + " ".join(f"{v:>7.4f}" for v in c) + f"   {self.barriers[n]:.4f}"
                 for n, c in self.curves.items()]
        return "\n".join(rows)

    def save(self, output_dir: str | os.PathLike, plot: bool = True, stem: str = "barrier") -> list[Path]:
        """Write ``<stem>.json``, ``.csv`` and (with matplotlib) ``.png`` atomically; returns the paths."""
        return save_report(output_dir, stem, self.to_json(), self.to_csv(),
                           (lambda png: plot_barrier(self, png)) if plot else None)


def plot_barrier(report: BarrierReport, path: str | os.PathLike) -> Path | None:
    """PNG: the loss along θ(λ) of each variant, its barrier in the legend; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for name, curve in report.curves.items():
        ax.plot(report.lambdas, curve, "o-", ms=3, label=f"{name} (barrier {report.barriers[name]:.3f})")
    ax.set_xlabel("λ (0 = model A, 1 = model B)")
    ax.set_ylabel("loss L(θ(λ))")
    ax.set_title("Loss along the linear path, before and after alignment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def barrier_report(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    methods: Sequence[str] = METHODS,
    match_data: Any = None,
    lambdas: Iterable[float] = DEFAULT_LAMBDAS,
    loss_fn: LossFn | None = None,
    family: str | None = None,
    seed: int = 0,
) -> BarrierReport:
    """The loss along θ(λ) from ``model_a`` to ``model_b`` unaligned and/or aligned (``methods`` among
    ``"unaligned"``, ``"weight"``, ``"activation"``), each curve's barrier, on ``data`` (one batch or
    batches; the loss as in :func:`loss_along_path`). ``match_data``: the sample activation matching
    correlates on (default ``data``; the paper matches on training data and reports held-out loss)."""
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"methods: a non-empty list of distinct names among {METHODS}, got {methods!r}")
    grid = _check_lambdas(lambdas)
    a = dict(model_a.state_dict())
    curves, barriers, moved = {}, {}, {}
    for method in methods:
        if method == "unaligned":
            b, perms = dict(model_b.state_dict()), {}
        else:
            b, perms = align_models(model_a, model_b, method, match_data if match_data is not None else data,
                                    family, seed)
        name = "unaligned" if method == "unaligned" else f"{method} matching"
        curves[name] = loss_along_path(model_a, a, b, data, grid, loss_fn)
        barriers[name] = loss_barrier(grid, curves[name])
        moved[name] = sum(int((p != torch.arange(len(p))).sum()) for p in perms.values())
    return BarrierReport(grid, curves, barriers, moved, {"methods": methods, "seed": seed,
                                                         "batches": len(as_batches(data))})
