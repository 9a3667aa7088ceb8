"""Which modules a model can spare, which layers are sharp along the WiSE-FT path (RiFT, its diagnostic).

Both measure a worst-case loss increase when only one group of weights (a module, a layer) is perturbed
within a ball, found by projected gradient ascent (maths in :mod:`robustft.ops.sharpness`):

- :func:`module_criticality`: RiFT's module robust criticality (Zhu et al., ICCV 2023, the MRC definition),
  MRC(M) = max_{‖ΔW‖₂ ≤ ε‖W‖₂} L(θ + ΔW on M) − L(θ); :func:`least_critical_module` is the module RiFT
  fine-tunes alone (then WiSE-FT interpolates start and fine-tuned, docs/regularizers.md).
- :func:`layer_sharpness` / :func:`sharpness_along_path`: per-layer worst-case adaptive sharpness
  (Andriushchenko et al., 2023, Eq. 1, c = |w|, ℓ∞; one layer at a time as in Abdollahpoorrostam, 2024,
  "In Search of the Successful Interpolation") of θ(α) for each α, a layers × α table
  (:class:`SharpnessReport`, JSON/CSV and a PNG heatmap by :func:`plot_sharpness`).
- the remedy: :func:`straggler_layers` picks the few layers that stand out in that table, and
  :func:`treat_stragglers` gives the WiSE-FT end points with their task vector sparsified (the paper's
  "inducing sparsity in the straggler layers"), or with them kept at the start or at the fine-tuned values.

The model is run by ``torch.func.functional_call`` on θ + δ (``robustft.core.model.call_with_weights``), so
the perturbation is never written into it; gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is
touched). The model runs in eval mode (no dropout) and gets its modes back; along the path θ(α) is written by
:func:`robustft.interpolation.wise_ft.evaluate_at_alphas`, which puts the fine-tuned values back
bit-exactly, also on error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.checks import check_number
from robustft.core.checkpoint import pyplot, save_figure, save_report
from robustft.core.model import as_batches, call_with_weights
from robustft.core.params import select_parameters, train_mode
from robustft.interpolation.wise_ft import DEFAULT_ALPHAS, WiseFTWeights, check_alphas, evaluate_at_alphas
from robustft.ops.dtypes import compute_dtype

# one home for running a model on given weights and for its default loss (learned.py's, kept private there)
from robustft.ops.interpolate import check_method
from robustft.ops.outputs import model_loss
from robustft.ops.sharpness import ascent_step, check_ball, treat_layers, worst_case_increase

__all__ = [
    "SharpnessReport",
    "default_modules",
    "layer_sharpness",
    "least_critical_module",
    "module_criticality",
    "plot_sharpness",
    "sharpness_along_path",
    "straggler_layers",
    "treat_stragglers",
]

LossFn = Callable[[Any, Any], torch.Tensor]


def default_modules(model: nn.Module) -> list[str]:
    """Names of the modules that own a ≥ 2-D floating ``weight`` themselves (Linear, Conv, Embedding, ...):
    RiFT's modules (its code measures every Conv2d and Linear)."""
    names = []
    for name, module in model.named_modules():
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is not None and weight.is_floating_point() and weight.dim() >= 2:
            names.append(name)
    return names


def _groups(model: nn.Module, names: Sequence[str] | None, option: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> its floating parameters (recursively, full names); every name must be a module."""
    if isinstance(names, str):
        names = [names]
    names = default_modules(model) if names is None else list(names)
    if not names:
        raise ValueError(f"{option}: no module to measure (the model has no Linear/Conv/Embedding-like "
                         "module; name the modules)")
    modules = dict(model.named_modules())
    groups = {}
    for name in names:
        if name not in modules:
            shown = [m for m in modules if m][:5]
            raise ValueError(f"{option}: {name!r} is not a module of the model (module names are those of "
                             f"model.named_modules(), e.g. {shown})")
        prefix = f"{name}." if name else ""
        params = {prefix + n: p for n, p in modules[name].named_parameters() if p.is_floating_point()}
        if not params:
            raise ValueError(f"{option}: module {name!r} has no floating parameter to perturb")
        groups[name] = params
    return groups


def _check_search(ball: str, radius: float, steps: int, step_size: float, radius_name: str) -> float:
    value = check_ball(ball, radius, name=radius_name)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
            math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size: expected a finite number > 0, got {step_size!r}")
    return value


def _perturbed(params: Mapping[str, torch.Tensor], deltas: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ + δ on the group (δ added in its wider dtype, rounded to each weight's dtype)."""
    pairs = zip(params.items(), deltas, strict=True)
    return {n: (p.detach().to(d.dtype) + d).to(p.dtype) for (n, p), d in pairs}


def _pass(model: nn.Module, params: Mapping[str, torch.Tensor], deltas: Sequence[torch.Tensor],
          batches: Sequence[Any], score: LossFn, grad: bool) -> tuple[float, list[torch.Tensor] | None]:
    """Mean over the batches of the loss at θ + δ on the group, and its gradient in δ when ``grad`` (None
    when the loss does not depend on the group at all: a module the forward pass does not use)."""
    leaves = [d.detach().requires_grad_(grad) for d in deltas]
    grads = [torch.zeros_like(d) for d in leaves] if grad else None
    total, reached = 0.0, False
    for batch in batches:
        with torch.enable_grad() if grad else torch.no_grad():
            loss = score(call_with_weights(model, _perturbed(params, leaves), batch), batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn: must return the batch's loss as a scalar tensor")
            total += float(loss.detach()) / len(batches)
            if grad and loss.requires_grad:
                for acc, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True), strict=True):
                    if g is not None:
                        reached = True
                        acc.add_(g.to(acc.dtype), alpha=1.0 / len(batches))
    return total, grads if reached else None


def _measure(model: nn.Module, batches: Sequence[Any], groups: Mapping[str, Mapping[str, torch.Tensor]],
             ball: str, radius: float, steps: int, step_size: float,
             loss_fn: LossFn | None) -> tuple[float, dict[str, float], list[str]]:
    """(L(θ), {group: max(0, max_k L(θ + δ_k) − L(θ))}, unused groups) with δ_k the iterates of ``steps``
    projected ascent steps from δ = 0 on that group alone; the loss is the mean over ``batches`` (one δ for
    all of them). A group the loss does not depend on (no gradient reaches it) gets 0 and is listed."""
    score = loss_fn or model_loss
    base = math.nan
    out: dict[str, float] = {}
    unused: list[str] = []
    with train_mode(model, False):
        for name, params in groups.items():
            weights = [p.detach() for p in params.values()]
            deltas = [torch.zeros_like(w, dtype=compute_dtype(w.dtype)) for w in weights]
            losses = []
            for k in range(steps):
                loss, grads = _pass(model, params, deltas, batches, score, grad=True)
                if k == 0:
                    base = loss
                    if not math.isfinite(base):
                        raise FloatingPointError(f"the loss at the unperturbed weights is not finite "
                                                 f"({base}); nothing to measure")
                else:
                    losses.append(loss)
                if grads is None:
                    unused.append(name)
                    break
                deltas = ascent_step(deltas, weights, grads, radius, ball, step_size)
            if name in unused:
                out[name] = 0.0
                continue
            losses.append(_pass(model, params, deltas, batches, score, grad=False)[0])
            out[name] = worst_case_increase(base, losses)
    return base, out, unused


def module_criticality(
    model: nn.Module,
    data: Any,
    modules: Sequence[str] | None = None,
    epsilon: float = 0.1,
    steps: int = 10,
    step_size: float = 1.0,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """RiFT's module robust criticality of each module: max_{‖ΔW‖₂ ≤ ε‖W‖₂} L(θ + ΔW on M) − L(θ).

    ``data``: one batch (a mapping of model kwargs, Hugging Face style; an input tensor; or an ``(inputs,
    *targets)`` tuple for a ``loss_fn(outputs, batch)``) or a list/DataLoader of batches, read once; the
    loss is the mean over the batches of each batch's loss (default: the model's own ``outputs.loss``).
    RiFT measures it on the (adversarial) examples the model must stay robust on. ``modules``: names from
    ``model.named_modules()``, each perturbed with all its parameters (default :func:`default_modules`).
    ``epsilon`` is relative to ‖W‖ (RiFT's 0.1); ``steps`` projected ascent steps of size
    ``step_size``·ε‖W‖ along the normalised gradient (RiFT's code: 10 epochs of SGD, each followed by the
    projection); the largest loss over the iterates counts. The model's weights are never written.
    """
    return _criticality(model, data, modules, epsilon, steps, step_size, loss_fn)[0]


def _criticality(model: nn.Module, data: Any, modules: Sequence[str] | None, epsilon: float, steps: int,
                 step_size: float, loss_fn: LossFn | None) -> tuple[dict[str, float], list[str]]:
    radius = _check_search("relative_l2", epsilon, steps, step_size, "epsilon")
    groups = _groups(model, modules, "modules")
    batches = as_batches(data)
    _, mrc, unused = _measure(model, batches, groups, "relative_l2", radius, steps, step_size, loss_fn)
    return mrc, unused


def least_critical_module(
    model: nn.Module,
    data: Any,
    modules: Sequence[str] | None = None,
    epsilon: float = 0.1,
    steps: int = 10,
    step_size: float = 1.0,
    loss_fn: LossFn | None = None,
) -> str:
    """The module of lowest MRC (:func:`module_criticality`, same options; the first of equal ones): the one
    RiFT fine-tunes alone (``requires_grad`` on its parameters only). A module the loss does not depend on
    (MRC 0 because the forward pass never uses it, e.g. an unused pooler) is never chosen."""
    mrc, unused = _criticality(model, data, modules, epsilon, steps, step_size, loss_fn)
    used = [m for m in mrc if m not in unused]
    if not used:
        raise ValueError(f"modules: the loss depends on none of {list(mrc)[:5]}; nothing to fine-tune")
    return min(used, key=mrc.__getitem__)


def layer_sharpness(
    model: nn.Module,
    data: Any,
    layers: Sequence[str] | None = None,
    rho: float = 0.01,
    ball: str = "adaptive_linf",
    steps: int = 5,
    step_size: float = 1.0,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Worst-case adaptive sharpness of each layer alone: max_{|δ_j| ≤ ρ|w_j|} L(θ + δ on the layer) − L(θ).

    ``ball="relative_l2"`` uses RiFT's ball instead (then it is :func:`module_criticality` with ε = ``rho``).
    ``data``, ``loss_fn``, ``steps``, ``step_size`` as in :func:`module_criticality`; ``layers`` are module
    names (a transformer block's name perturbs the whole block; ``""`` the whole model).
    """
    radius = _check_search(ball, rho, steps, step_size, "rho")
    groups = _groups(model, layers, "layers")
    return _measure(model, as_batches(data), groups, ball, radius, steps, step_size, loss_fn)[1]


def _path_weights(start: nn.Module | Mapping[str, torch.Tensor], finetuned: nn.Module) -> WiseFTWeights:
    """θ(α) between ``start`` (a model or a state dict) and ``finetuned``, written into ``finetuned``."""
    if isinstance(start, nn.Module):
        return WiseFTWeights.from_models(start, finetuned)
    if not isinstance(start, Mapping):
        raise ValueError(f"start: expected a model or a state dict, got {type(start).__name__}")
    end = select_parameters(finetuned, trainable_only=False, buffers=True)
    weights = WiseFTWeights(end, check_start=False)
    for name in weights.lora_b:  # θ(α) scales B·A from B = 0: a start with another B has no rank-r θ(α)
        if name in start and torch.as_tensor(start[name]).count_nonzero():
            raise ValueError(f"start: LoRA factor {name!r} is not zero in the start state dict")
    weights.start.load_state_dict(start, source="start")
    return weights


@dataclass
class SharpnessReport:
    """Per-layer sharpness of θ(α) (``sharpness[layer][i]`` at ``alphas[i]``) and the loss L(θ(α))."""

    alphas: list[float]
    layers: list[str]
    sharpness: dict[str, list[float]]
    loss: list[float]
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def sharpest(self) -> list[str]:
        """The sharpest layer at each α (the "straggler" that makes θ(α) fail, when one stands out)."""
        return [max(self.layers, key=lambda layer: self.sharpness[layer][i]) for i in range(len(self.alphas))]

    def to_csv(self) -> str:
        """One row per layer (and a first ``loss`` row), one column per α."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["layer"] + [f"{a:g}" for a in self.alphas])
        writer.writerow(["loss"] + [repr(v) for v in self.loss])
        for layer in self.layers:
            writer.writerow([layer] + [repr(v) for v in self.sharpness[layer]])
        return buf.getvalue()

    def table(self) -> str:
        """The table as text: α across, the loss then each layer's sharpness down."""
        width = max([len("loss")] + [len(layer) for layer in self.layers])
        rows = [f"{'α':>{width}} " + " ".join(f"{a:>9.2f}" for a in self.alphas),
                f"{'loss':>{width}} " + " ".join(f"{v:>9.4f}" for v in self.loss)]
        rows += [f"{layer:>{width}} " + " ".join(f"{v:>9.4f}" for v in self.sharpness[layer])
                 for layer in self.layers]
        return "\n".join(rows)

    def save(self, output_dir: str | os.PathLike, plot: bool = True, stem: str = "sharpness") -> list[Path]:
        """Write ``<stem>.json``, ``.csv`` and (with matplotlib) ``.png`` atomically; returns the paths."""
        return save_report(output_dir, stem, self.to_json(), self.to_csv(),
                           (lambda png: plot_sharpness(self, png)) if plot else None)


def plot_sharpness(report: SharpnessReport, path: str | os.PathLike) -> Path | None:
    """PNG: L(θ(α)) on top, the layers × α sharpness heatmap below; None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    n = len(report.layers)
    fig, (top, ax) = plt.subplots(2, 1, figsize=(7, 2.2 + 0.28 * n), layout="constrained",
                                  gridspec_kw={"height_ratios": [1.6, max(2.0, 0.28 * n)]})
    columns = range(len(report.alphas))  # one column per α, above the heatmap's columns
    top.plot(columns, report.loss, "o-", ms=4, color="black")
    top.set_xlim(-0.5, len(report.alphas) - 0.5)
    top.set_xticks(columns, [f"{a:g}" for a in report.alphas])
    top.set_ylabel("loss L(θ(α))")
    top.set_xlabel("α (0 = start, 1 = fine-tuned)")
    top.grid(alpha=0.3)
    top.set_title("Layer-wise sharpness along the WiSE-FT path")
    values = [report.sharpness[layer] for layer in report.layers]
    image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(report.alphas)), [f"{a:g}" for a in report.alphas])
    ax.set_yticks(range(n), report.layers, fontsize=7)
    ax.set_xlabel("α")
    ball = report.options.get("ball", "")
    radius = report.options.get("rho", "")
    # one colour bar beside both panels keeps the loss points above their heatmap columns
    fig.colorbar(image, ax=[top, ax], fraction=0.04, pad=0.02,
                 label=f"worst-case loss increase ({ball}, ρ={radius})")
    return save_figure(fig, path)


def sharpness_along_path(
    start: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module,
    data: Any,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    layers: Sequence[str] | None = None,
    rho: float = 0.01,
    ball: str = "adaptive_linf",
    steps: int = 5,
    step_size: float = 1.0,
    loss_fn: LossFn | None = None,
    method: str = "linear",
) -> SharpnessReport:
    """:func:`layer_sharpness` of θ(α) = (1−α)·θ_start + α·θ_ft for each α, and the loss L(θ(α)).

    ``start``: the start model or its state dict (every floating parameter and buffer of ``finetuned`` is
    interpolated, as :func:`robustft.interpolation.wise_ft.interpolate_models`); ``finetuned`` is the model
    that is run:
    θ(α) is written into its tensors one α at a time and its own values come back bit-exactly afterwards, also
    if the model raises. Cost per α: layers × (steps forward/backward + 1 forward) over ``data``.
    """
    radius = _check_search(ball, rho, steps, step_size, "rho")
    grid = check_alphas(list(alphas))
    check_method(method)
    groups = _groups(finetuned, layers, "layers")
    batches = as_batches(data)
    weights = _path_weights(start, finetuned)

    def run(i: int) -> tuple[float, dict[str, float]]:
        return _measure(finetuned, batches, groups, ball, radius, steps, step_size, loss_fn)

    results = evaluate_at_alphas(weights, grid, run, method)
    names = list(groups)
    return SharpnessReport(
        alphas=grid,
        layers=names,
        sharpness={layer: [r[1][layer] for r in results] for layer in names},
        loss=[r[0] for r in results],
        options={"ball": ball, "rho": radius, "steps": steps, "step_size": step_size, "method": method,
                 "batches": len(batches)},
    )


#: how :func:`straggler_layers` ranks layers
STRAGGLER_RULES = ("sharpest", "excess")


def straggler_layers(report: SharpnessReport, k: int = 1, rule: str = "sharpest") -> list[str]:
    """The ``k`` layers of ``report`` that stand out along the path, most first (ties: report order).

    ``rule="sharpest"``: by max_α S_l(α), the layer-wise sharpness itself; ``"excess"``: by max_α of
    S_l(α) − ((1−α)·S_l(0) + α·S_l(1)) over the α strictly inside the path (a layer that turns sharp in the
    middle, as a loss barrier; only layers with an excess > 0 count, so fewer than ``k`` may come back).
    """
    k = check_number("k", k, low=1, integer=True)
    if rule not in STRAGGLER_RULES:
        raise ValueError(f"rule must be one of {STRAGGLER_RULES}, got {rule!r}")
    alphas = report.alphas
    if rule == "sharpest":
        score = {layer: max(report.sharpness[layer]) for layer in report.layers}
    else:
        if alphas[0] != 0.0 or alphas[-1] != 1.0 or len(alphas) < 3:
            raise ValueError("rule='excess' needs a report with α = 0, 1 and at least one α between")
        score = {}
        for layer in report.layers:
            values = report.sharpness[layer]
            excess = max(v - ((1 - a) * values[0] + a * values[-1])
                         for a, v in zip(alphas[1:-1], values[1:-1], strict=True))
            if excess > 0:
                score[layer] = excess
    order = sorted(score, key=lambda layer: (-score[layer], report.layers.index(layer)))
    return order[:k]


def treat_stragglers(
    start: nn.Module | Mapping[str, torch.Tensor],
    finetuned: nn.Module,
    layers: Sequence[str],
    treatment: str = "sparsify",
    density: float = 0.1,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(start, fine-tuned) state dicts with every floating parameter of the modules ``layers`` treated by
    :func:`robustft.ops.sharpness.treat_layers` (``treatment`` in ``TREATMENTS``; ``density``: the fraction
    of each tensor's task vector kept by ``"sparsify"``); load them into copies and interpolate as usual."""
    groups = _groups(finetuned, list(layers), "layers")
    names = [n for params in groups.values() for n in params]
    a = start.state_dict() if isinstance(start, nn.Module) else dict(start)
    b = finetuned.state_dict()
    return treat_layers(a, b, names, treatment, density)
