"""DaWin (Oh et al., 2025, arXiv:2410.03782) on a Trainer's eval sets: a per-input α from the endpoints'
entropies, one interpolation per Beta-mixture component (maths in :mod:`robustft.ops.dawin`), each θ(α)
written by :func:`robustft.interpolation.wise_ft.evaluate_at_alphas`; reported beside the WiSE-FT curve.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from robustft.core import distributed
from robustft.core.model import is_causal_lm
from robustft.interpolation.wise_ft import WiseFTWeights, evaluate_at_alphas
from robustft.ops.dawin import (
    BetaMixture,
    batch_entropy,
    check_procedure,
    component_alphas,
    dawin_lambda,
    fit_beta_mixture,
    fit_beta_mixture_kmeans,
)
from robustft.ops.interpolate import check_method

__all__ = ["DaWinResult", "check_dawin_metric", "dawin_evaluate", "dawin_plan"]


# -- DaWin: a per-input α, one interpolation per mixture component ------------------------------
@dataclass
class DaWinResult:
    """DaWin's metric on every eval set, with each set's mixture components (α_k and input counts)."""

    results: dict[str, float]
    metric: str
    n_components: int
    alphas: dict[str, list[float]]
    counts: dict[str, list[int]]
    mean_lambda: dict[str, float]
    loss: dict[str, float] = field(default_factory=dict)
    #: eval sets without labels: no metric (as ``Trainer.evaluate``), their components are still reported
    unlabeled: list[str] = field(default_factory=list)
    #: how the mixture was fitted and where each component was evaluated (``robustft.ops.dawin.PROCEDURES``)
    procedure: str = "paper"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """One row per eval set: the metric ("-" without labels), mean λ and the components as α×count."""
        rows = [f"{'eval set':>14} {self.metric:>10} {'mean λ':>7}  components (α × inputs)"]
        for name in self.alphas:
            pairs = zip(self.alphas[name], self.counts[name], strict=True)
            comps = ", ".join(f"{a:.3f}×{c}" for a, c in pairs)
            value = f"{self.results[name]:>10.4f}" if name in self.results else f"{'-':>10}"
            rows.append(f"{name[:14]:>14} {value} {self.mean_lambda[name]:>7.3f}  {comps}")
        return "\n".join(rows)


@contextmanager
def _trainer_attributes(trainer, **values: Any) -> Iterator[None]:
    """Public Trainer attributes (``compute_metrics``, ...) replaced for a while, restored on exit."""
    saved = {k: getattr(trainer, k) for k in values}
    for k, v in values.items():
        setattr(trainer, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)


def _subset(dataset, indices: torch.Tensor):
    rows = indices.tolist()
    if hasattr(dataset, "select"):  # datasets.Dataset: the Trainer still drops its unused columns
        return dataset.select(rows)
    return torch.utils.data.Subset(dataset, rows)


def _predict(trainer, dataset, prefix: str):
    out = trainer.predict(dataset, metric_key_prefix=prefix)
    if out.predictions is None:
        raise ValueError("DaWin needs the model's predictions: set prediction_loss_only=False in the "
                         "TrainingArguments")
    return out


def _reassemble(parts: Sequence[Any], groups: Sequence[torch.Tensor]) -> Any:
    """The per-component outputs (arrays or nested tuples, in component order) back in input order."""
    import numpy as np
    from transformers.trainer_pt_utils import nested_concat  # pads along dim 1 when lengths differ

    joined = parts[0]
    for part in parts[1:]:
        joined = nested_concat(joined, part, padding_index=-100)
    inverse = np.argsort(torch.cat(list(groups)).numpy(), kind="stable")

    def take(x):
        return type(x)(take(t) for t in x) if isinstance(x, (tuple, list)) else x[inverse]

    return take(joined)


def check_dawin_metric(metric: str) -> None:
    """Refuse DaWin's ``metric="loss"`` on several ranks, where the Trainer's evaluation loss is not exact.

    Under DDP accelerate completes a rank's last evaluation batch with samples from the start of the set
    (even batches), and the Trainer's loss is a per-batch mean repeated per sample, so the padding's losses
    enter the mean whenever a component's size is not a multiple of ranks × eval batch. The predictions are
    gathered exactly, so a ``compute_metrics`` metric is the same as on one process.
    """
    if metric.removeprefix("eval_") == "loss" and distributed.world_size() > 1:
        raise ValueError(
            f"metric: DaWin with metric='loss' is refused on {distributed.world_size()} ranks: the Trainer's "
            "evaluation loss averages in the padding samples of uneven sets under DDP, so it would differ "
            "from one process; give the Trainer a compute_metrics (scored on the gathered predictions, "
            "exact) and name its metric"
        )


def dawin_plan(
    lam: torch.Tensor, n_components: int, procedure: str = "paper", seed: int = 1
) -> tuple[BetaMixture, list[float], list[torch.Tensor]]:
    """(mixture, α_k, input indices of component k) for one eval set's λ values.

    ``"paper"``: the authors' k-means-initialised EM (seed ``seed``) and α_k = a_k/(a_k+b_k);
    ``"routed_mean"``: quantile-initialised EM and α_k = the mean λ of the inputs routed to k.
    """
    k = min(n_components, lam.numel())
    if check_procedure(procedure) == "paper":
        mixture = fit_beta_mixture_kmeans(lam, k, seed=seed)
        return mixture, *component_alphas(lam, mixture.assign(lam), mixture)
    mixture = fit_beta_mixture(lam, k)
    return mixture, *component_alphas(lam, mixture.assign(lam))


def dawin_evaluate(
    trainer,
    weights: WiseFTWeights,
    eval_datasets: Mapping[str, Any],
    n_components: int = 3,
    metric: str = "accuracy",
    method: str = "linear",
    causal_lm: bool | None = None,
    key_prefix: str = "dawin",
    procedure: str = "paper",
    seed: int = 1,
) -> DaWinResult:
    """DaWin on every eval set with the Trainer's evaluation loop; the model's weights are left as found.

    Per set: the prediction entropies of θ(0) and θ(1) (two ``trainer.predict`` passes whose logits are
    reduced to one entropy per input in the loop, so no logits are kept), λ(x) =
    sigmoid(H_start − H_ft), a ``n_components``-Beta mixture fitted to the λ of that set, each input
    routed to its most likely component and predicted at that component's α by :func:`evaluate_at_alphas`
    (one interpolation per component; :func:`dawin_plan`). ``procedure="paper"`` (default) is the authors':
    k-means-initialised EM (``seed``) and α_k = a_k/(a_k+b_k), the component's fitted Beta mean;
    ``"routed_mean"`` fits from quantile groups and evaluates each component at the mean λ of its inputs.
    The predictions are put back in input order and scored by ``trainer.compute_metrics`` on the whole
    set, so any metric works (``metric="loss"``: the input-weighted mean of the components' losses, no
    ``compute_metrics`` needed). For a causal LM (``causal_lm``; default: :func:`is_causal_lm`) the entropy
    of a sequence is the mean next-token entropy over the positions that predict a label. ``loss`` is the
    input-weighted mean of the components' losses; on several ranks it is left out and ``metric="loss"`` is
    refused (:func:`check_dawin_metric`). A set without labels gets no metric and no loss, as in
    ``Trainer.evaluate`` (``compute_metrics`` is never called with ``label_ids=None``): it is listed in
    ``unlabeled`` with a warning, its components still reported.
    """
    check_dawin_metric(metric)
    key = metric.removeprefix("eval_")
    if trainer.compute_metrics is None and key != "loss":
        raise ValueError(f"metric: DaWin scores the reassembled predictions with the Trainer's "
                         f"compute_metrics; give the Trainer one that returns {metric!r} (or metric='loss')")
    check_method(method)
    check_procedure(procedure)
    causal = is_causal_lm(trainer.model) if causal_lm is None else bool(causal_lm)
    names = list(eval_datasets)
    compute = trainer.compute_metrics

    def entropies(i: int) -> dict[str, torch.Tensor]:
        return {n: torch.as_tensor(_predict(trainer, eval_datasets[n], f"{key_prefix}_h{i}_{n}").predictions)
                for n in names}

    def reduce(logits, labels):
        return batch_entropy(logits, labels, causal)

    with _trainer_attributes(trainer, compute_metrics=None, preprocess_logits_for_metrics=reduce):
        h_start, h_ft = evaluate_at_alphas(weights, [0.0, 1.0], entropies, method)
    plan: list[tuple[str, float, torch.Tensor]] = []
    alphas: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    mean_lambda: dict[str, float] = {}
    for n in names:
        lam = dawin_lambda(h_start[n].to(torch.float64), h_ft[n].to(torch.float64))
        if lam.numel() == 0:
            raise ValueError(f"eval_datasets: {n!r} is empty")
        _, comp_alphas, groups = dawin_plan(lam, n_components, procedure, seed)
        plan += [(n, a, g) for a, g in zip(comp_alphas, groups, strict=True)]
        alphas[n], counts[n] = comp_alphas, [len(g) for g in groups]
        mean_lambda[n] = float(lam.mean())

    def predict_component(i: int):
        n, alpha, group = plan[i]
        return _predict(trainer, _subset(eval_datasets[n], group), f"{key_prefix}_c{i}_{n}")

    with _trainer_attributes(trainer, compute_metrics=None):
        outputs = evaluate_at_alphas(weights, [a for _, a, _ in plan], predict_component, method)
    results: dict[str, float] = {}
    loss: dict[str, float] = {}
    unlabeled: list[str] = []
    from transformers import EvalPrediction

    for n in names:
        mine = [i for i, (m, _, _) in enumerate(plan) if m == n]
        groups = [plan[i][2] for i in mine]
        if any(outputs[i].label_ids is None for i in mine):
            # as Trainer.evaluate: no labels, no compute_metrics (it would score against None) and no loss
            unlabeled.append(n)
            continue
        losses = [(outputs[i].metrics.get(f"{key_prefix}_c{i}_{n}_loss"), len(plan[i][2])) for i in mine]
        if all(v is not None for v, _ in losses) and distributed.world_size() == 1:
            loss[n] = sum(float(v) * c for v, c in losses) / sum(c for _, c in losses)
        if key == "loss":
            if n not in loss:
                raise ValueError(f"metric: 'loss' but the model returned no loss on {n!r}")
            results[n] = loss[n]
            continue
        preds = _reassemble([outputs[i].predictions for i in mine], groups)
        labels = _reassemble([outputs[i].label_ids for i in mine], groups)
        scores = compute(EvalPrediction(predictions=preds, label_ids=labels))
        if key not in scores:
            raise ValueError(f"metric: {metric!r} not in compute_metrics' results on {n!r} "
                             f"(keys: {sorted(scores)})")
        results[n] = float(scores[key])
    if unlabeled:
        warnings.warn(f"DaWin: no labels in the eval set(s) {unlabeled}: no {metric} for them (as "
                      "Trainer.evaluate, compute_metrics is not called); their components are reported",
                      RuntimeWarning, stacklevel=2)
    return DaWinResult(results, metric, n_components, alphas, counts, mean_lambda, loss, unlabeled, procedure)
