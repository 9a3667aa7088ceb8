"""WiSE-FT as a Trainer callback: snapshot the start, interpolate (or sweep α) when training ends.

Usage::

    cb = WiseFTCallback(eval_datasets={"id": val, "shifted": ood}, id_dataset="id")
    trainer = Trainer(..., callbacks=[cb]); trainer.train()   # model now holds θ(α*)

The sweep needs the Trainer's own ``evaluate``; callbacks are handed no trainer, so the
callback finds it on the call stack of ``on_train_begin`` (the Trainer is the caller of its
callback handler), or takes it from :meth:`WiseFTCallback.attach` / ``trainer=``.

``dynamic="dawin"`` also reports DaWin (a per-input α, one interpolation per Beta-mixture component;
docs/dynamic_interpolation.md) on every eval set beside the static curve; the model is still left at θ(α*).

With an averaging callback that copies its average into the model at the end
(``copy_to_model_at_end=True``), the end point is that average, whatever the order of the callbacks:
averages are copied in first, then θ(α) is set between the start and them (docs/composition.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from robustft.callbacks.base import END_INTERPOLATE, RobustCallback
from robustft.checks import check_bool, check_id_dataset, check_number, compile_patterns
from robustft.core import distributed
from robustft.core.params import SelectionGuard, check_snapshot_spec, is_sharded, select_parameters
from robustft.interpolation.dawin import DaWinResult, check_dawin_metric, dawin_evaluate
from robustft.interpolation.wise_ft import (
    DEFAULT_ALPHAS,
    AlphaBudget,
    WiseFTCurve,
    WiseFTWeights,
    check_alphas,
    check_budget,
    wise_ft_sweep,
)
from robustft.ops.dawin import check_procedure
from robustft.ops.interpolate import check_alpha, check_method

__all__ = ["DYNAMIC_METHODS", "WiseFTCallback"]

#: per-input interpolations reported beside the static curve (``dynamic=``)
DYNAMIC_METHODS = ("dawin",)

logger = logging.getLogger(__name__)


class WiseFTCallback(RobustCallback):
    """θ(α) = (1−α)·θ_start + α·θ_end at the end of training, for a fixed α or the best α of a sweep.

    θ_end is the model's weights once every average to be copied in is (see docs/composition.md).

    Args:
        alpha: fixed α to leave in the model. With ``eval_datasets`` the curve is still measured.
        alphas: grid swept when ``eval_datasets`` are given (default 0, 0.1, ..., 1).
        method: ``"linear"`` (WiSE-FT) or ``"slerp"`` (per tensor, linear for near-parallel tensors).
        eval_datasets: name -> dataset, evaluated with ``trainer.evaluate`` at every α.
        id_dataset: the in-distribution set α is chosen on (never the shifted ones).
        metric: key of the Trainer's metrics (``compute_metrics``) to choose on, e.g. ``"accuracy"``.
        greater_is_better: False for a loss-like metric.
        budget: choose α* as the best ``metric`` on ``id_dataset`` among the α whose constraint metric on
            another eval set stays within ε of its value at α=0: an :class:`AlphaBudget` or a mapping of its
            fields, e.g. ``{"dataset": "retained", "metric": "loss", "epsilon": 0.1}``. None (default):
            the ID-only rule. Needs α=0 in ``alphas``. (docs/wise_ft.md, "α under a forgetting budget")
        snapshot_device: ``"same"`` or ``"cpu"`` (offload the start copy).
        include / exclude: regexes selecting the interpolated trainable parameters.
        extrapolate: allow α outside [0, 1].
        save_curve: write ``wise_ft.json``/``.csv``/``.png`` into ``output_dir`` (main process).
        sweep_at_eval: also sweep at every intermediate evaluation (logs only; the model is restored).
        dynamic: ``"dawin"`` to also evaluate DaWin on every eval set at the end (reported, never applied).
        n_components: Beta-mixture components of DaWin (one interpolation each per eval set).
        dawin_procedure: ``"paper"`` (the authors' k-means-initialised fit, each component at its Beta mean
            a/(a+b)) or ``"routed_mean"`` (docs/dynamic_interpolation.md).
        trainer: the Trainer, if known (else found when training starts).
    """

    state_name = "wise_ft"
    end_phase = END_INTERPOLATE

    def __init__(
        self,
        alpha: float | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        method: str = "linear",
        eval_datasets: Mapping[str, Any] | None = None,
        id_dataset: str | None = None,
        metric: str = "accuracy",
        greater_is_better: bool = True,
        snapshot_device: str | torch.device = "same",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        extrapolate: bool = False,
        save_curve: bool = True,
        sweep_at_eval: bool = False,
        dynamic: str | None = None,
        n_components: int = 3,
        dawin_procedure: str = "paper",
        progress: bool = True,
        trainer=None,
        budget: AlphaBudget | Mapping[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for option, value in (("extrapolate", extrapolate), ("greater_is_better", greater_is_better),
                              ("save_curve", save_curve), ("sweep_at_eval", sweep_at_eval),
                              ("progress", progress)):
            check_bool(option, value)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be the name of an evaluation metric, got {metric!r}")
        check_snapshot_spec(snapshot_device, None, device_name="snapshot_device")
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.alpha = None if alpha is None else check_alpha(alpha, extrapolate)
        self.alphas = check_alphas(alphas, extrapolate)
        self.method = check_method(method)
        self.eval_datasets = dict(eval_datasets or {})
        if self.alpha is None and not self.eval_datasets:
            raise ValueError("WiseFTCallback: give a fixed `alpha` or `eval_datasets` to choose α on")
        id_dataset = check_id_dataset(self.eval_datasets, id_dataset)
        if dynamic is not None and dynamic not in DYNAMIC_METHODS:
            raise ValueError(f"dynamic: {dynamic!r} is not None or one of {', '.join(DYNAMIC_METHODS)}")
        if dynamic is not None and not self.eval_datasets:
            raise ValueError(f"dynamic={dynamic!r} is measured on eval_datasets; give them")
        if budget is not None:
            if not self.eval_datasets:
                raise ValueError("budget: α is chosen under a budget only in a sweep; give eval_datasets")
            budget = check_budget(budget, self.eval_datasets, self.alphas)
        self.budget: AlphaBudget | None = budget
        n_components = check_number("n_components", n_components, low=1, integer=True)
        self.dynamic, self.n_components = dynamic, n_components
        self.dawin_procedure = check_procedure(dawin_procedure)
        self.dawin: DaWinResult | None = None
        self.id_dataset = id_dataset
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.snapshot_device = snapshot_device
        self.include, self.exclude = include, exclude
        self.extrapolate = extrapolate
        self.save_curve = save_curve
        self.sweep_at_eval = sweep_at_eval
        self.progress = progress
        self.trainer = trainer
        self.weights: WiseFTWeights | None = None
        self.curve: WiseFTCurve | None = None
        self.guard: SelectionGuard | None = None
        self._sweeping = False

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.weights is None:
            return {}, {}
        return self.weights.state_dict()

    def load_state_dict(self, tensors, meta, source: str) -> None:
        self.weights.load_state_dict(tensors, meta, source)

    def sharded_state(self) -> bool:
        return self.weights is not None and is_sharded(self.weights.params)

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)  # finds the Trainer if not given
        if self.eval_datasets and self.trainer is None:
            raise ValueError(
                "WiseFTCallback: a sweep needs the Trainer; pass trainer= or call attach(trainer)"
            )
        if (self.dynamic and self.trainer.compute_metrics is None
                and self.metric.removeprefix("eval_") != "loss"):
            raise ValueError(f"WiseFTCallback: dynamic={self.dynamic!r} scores predictions with the "
                             f"Trainer's compute_metrics; give the Trainer one that returns {self.metric!r}")
        if self.dynamic == "dawin":  # at train begin, not after the training it would evaluate
            check_dawin_metric(self.metric)
        params = select_parameters(model, include=self.include, exclude=self.exclude)
        self.guard = SelectionGuard(type(self).__name__, model, params)
        resume = self.resume_dir(args, state)
        if resume is not None:
            # the live weights are the checkpoint's: the start comes from the saved state
            self.weights = WiseFTWeights(params, device=self.snapshot_device, check_start=False, model=model)
            self.load_from(resume)
        else:
            self.weights = WiseFTWeights(params, device=self.snapshot_device, model=model)
        self.pending_logs["wise_ft_start_numel"] = float(self.weights.stored_numel())

    def restart_from_live(self) -> None:
        """Take the live weights as θ_start from now on: the hook LP-FT (``LPFTCallback``) uses to hand over
        the probed model at its phase boundary, so θ(α) runs from the probed to the fine-tuned model."""
        if self.weights is None:
            raise RuntimeError("WiseFTCallback.restart_from_live: training has not begun (no start snapshot)")
        self.guard.check()
        params, model = self.weights.params, self.weights.model
        self.weights = None  # free the old start before the new copy is taken
        self.weights = WiseFTWeights(params, device=self.snapshot_device, model=model)

    def on_evaluate(self, args, state, control, **kwargs):
        if not self.sweep_at_eval or self._sweeping or self.weights is None or not self.eval_datasets:
            return
        if self.trainer is None or not self.trainer.is_in_train:
            return
        self.guard.check()
        self._sweeping = True
        try:  # ends at α=1, i.e. bit-exactly the weights training continues from
            curve = self._sweep(apply_alpha=1.0)
        finally:
            self._sweeping = False
        self._record(curve, args, final=False)

    def end_of_training(self, args, state, control, **kwargs):
        """θ(α) from the start to the end point: the live weights, or an average copied in just before."""
        if self.weights is None:
            return
        self.guard.check()  # before any weight is written
        if self.eval_datasets:
            self._sweeping = True
            try:
                if self.dynamic == "dawin":  # first: the model is at θ_end, and is left there
                    self.dawin = dawin_evaluate(
                        self.trainer, self.weights, self.eval_datasets, self.n_components, self.metric,
                        self.method, procedure=self.dawin_procedure,
                    )
                self.curve = self._sweep(apply_alpha=self.alpha)
            finally:
                self._sweeping = False
            if self.dawin is not None:
                self.curve.extra["dawin"] = self.dawin.as_dict()
                logger.info("DaWin (K=%d):\n%s", self.n_components, self.dawin.table())
            self._record(self.curve, args, final=True)
        else:
            self.weights.apply_(self.alpha, self.method, extrapolate=self.extrapolate)
            logger.info("WiSE-FT: model set to θ(α=%s)", self.alpha)

    # -- helpers ----------------------------------------------------------------------------------
    def _sweep(self, apply_alpha: float | None) -> WiseFTCurve:
        with self.without_robustft_wrappers("evaluate"):  # the live weights, not an EMA swapped in
            return wise_ft_sweep(
                self.trainer,
                self.weights,
                self.eval_datasets,
                self.id_dataset,
                alphas=self.alphas,
                metric=self.metric,
                greater_is_better=self.greater_is_better,
                method=self.method,
                extrapolate=self.extrapolate,
                apply_alpha=apply_alpha,
                progress=self.progress,
                budget=self.budget,
            )

    def _record(self, curve: WiseFTCurve, args, final: bool) -> None:
        applied = curve.extra["applied_alpha"]
        logs = {"wise_ft_chosen_alpha": curve.chosen_alpha}
        if curve.budget is not None:
            logs["wise_ft_id_rule_alpha"] = curve.extra["id_rule_alpha"]
            logs["wise_ft_budget_limit"] = curve.budget_limit
        if final:
            logs["wise_ft_alpha"] = applied
        key = curve.metric.removeprefix("eval_")
        for name in curve.results:
            logs[f"wise_ft_{name}_{key}"] = curve.value(name, curve.chosen_alpha)
        if final and self.dawin is not None:
            logs.update({f"dawin_{name}_{key}": value for name, value in self.dawin.results.items()})
        self.trainer.log(logs)
        history = self.trainer.state.log_history
        if history:
            history[-1]["wise_ft_curve"] = curve.as_dict()
        if final and self.save_curve and distributed.is_main_process():
            curve.save(args.output_dir)
