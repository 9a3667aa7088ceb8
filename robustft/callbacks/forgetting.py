"""Forgetting you can watch: the retained loss and KL to base of a retention set, at every evaluation.

A retention set (:mod:`robustft.analysis.retention`) holds the base model's own greedy answers to general
prompts. At each evaluation of the Trainer (``eval_...`` metrics) :class:`ForgettingCallback` scores the
model on it and logs ``eval_retained_loss`` (mean answer-token loss) and/or ``eval_retained_kl``
(KL(p_base ‖ p_model) at the same tokens) to the Trainer's reporters, and adds them to the metrics
``evaluate()`` returns (so ``metric_for_best_model="eval_retained_loss"`` works). A budget can warn or stop
training when forgetting passes it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from robustft.analysis.retention import RetentionSet, encode_rows, pad_id, score_examples
from robustft.callbacks.base import RobustCallback
from robustft.checks import check_choice, check_number
from robustft.core import distributed
from robustft.lora.layers import is_peft_model

__all__ = ["ForgettingCallback"]

METRICS = ("loss", "kl")


class ForgettingCallback(RobustCallback):
    """Log the retained loss and/or KL to base on a retention set at each evaluation; optional budget.

    Args:
        retention: a :class:`~robustft.analysis.retention.RetentionSet`, the path of one (JSONL), or
            prompt-completion rows (``{"prompt", "completion"}``, text or chat messages).
        tokenizer: the tokenizer that encodes the rows; default the Trainer's ``processing_class``.
        metrics: ``"loss"``, ``"kl"`` or both (default both).
        reference: the base model for KL of a full model; a PEFT model needs none (its adapter is disabled
            for the base logits, no second model).
        max_loss_increase: budget on the retained loss: at most the start model's value (measured at
            ``on_train_begin``, kept in checkpoints) plus this.
        max_kl: budget on the KL to base.
        on_budget: ``"warn"`` (a RuntimeWarning and ``eval_retained_over_budget = 1``) or ``"stop"`` (also
            ``control.should_training_stop``: the Trainer stops after the current step).
        batch_size, max_length: examples per forward pass, tokens per example.
        prefix: metric name prefix (default ``"eval_retained"``).

    Under DDP each rank scores every ``world_size``-th example; the sums are all-reduced, so every rank
    logs the value one process would (up to summation order).
    """

    state_name = "forgetting"

    def __init__(self, retention: RetentionSet | str | os.PathLike | Sequence[Mapping[str, Any]], *,
                 tokenizer=None, metrics: str | Sequence[str] = METRICS,
                 reference: torch.nn.Module | None = None, max_loss_increase: float | None = None,
                 max_kl: float | None = None, on_budget: str = "warn",
                 batch_size: int = 8, max_length: int | None = None, prefix: str = "eval_retained",
                 **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(retention, (str, os.PathLike)):
            retention = RetentionSet.load(retention)
        if not isinstance(retention, RetentionSet):
            retention = list(retention)
            if not retention:
                raise ValueError("retention: no rows")
        self.retention = retention
        self.tokenizer = tokenizer
        self.metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not self.metrics or any(m not in METRICS for m in self.metrics):
            raise ValueError(f"metrics: expected 'loss', 'kl' or both, got {metrics!r}")
        self.reference = reference
        self.max_loss_increase = (None if max_loss_increase is None
                                  else check_number("max_loss_increase", max_loss_increase, 0))
        self.max_kl = None if max_kl is None else check_number("max_kl", max_kl, 0)
        if self.max_loss_increase is not None and "loss" not in self.metrics:
            raise ValueError("max_loss_increase: needs 'loss' in metrics")
        if self.max_kl is not None and "kl" not in self.metrics:
            raise ValueError("max_kl: needs 'kl' in metrics")
        check_choice("on_budget", on_budget, ("warn", "stop"))
        self.on_budget = on_budget
        self.batch_size = check_number("batch_size", batch_size, 1, integer=True)
        self.max_length = (None if max_length is None
                           else check_number("max_length", max_length, 2, integer=True))
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix: expected a non-empty string, got {prefix!r}")
        self.prefix = prefix
        self.start_loss: float | None = None
        self.last: dict[str, float] = {}
        self._last_step: int | None = None
        self._examples: list | None = None
        self._logged: dict[str, float] = {}

    # -- scoring -----------------------------------------------------------------------------------
    def _encoded(self, tokenizer) -> list:
        if self._examples is None:
            rows = (self.retention.model_rows(tokenizer) if isinstance(self.retention, RetentionSet)
                    else self.retention)
            self._examples = encode_rows(tokenizer, rows, self.max_length, source="retention")
        return self._examples

    def _tokenizer(self, kwargs: Mapping[str, Any]):
        tokenizer = self.tokenizer or kwargs.get("processing_class")
        if tokenizer is None and self.trainer is not None:
            tokenizer = getattr(self.trainer, "processing_class", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        if tokenizer is None:
            raise ValueError("ForgettingCallback: no tokenizer; pass tokenizer=... or give the Trainer a "
                             "processing_class")
        return tokenizer

    def _check_reference(self, model) -> None:
        if "kl" in self.metrics and self.reference is None and not is_peft_model(model):
            raise ValueError("ForgettingCallback: metrics include 'kl' but the model is not a PEFT model; "
                             "pass reference=<the base model> or metrics='loss'")

    def score(self, model, tokenizer) -> dict[str, float]:
        """``{"loss": ..., "kl": ...}`` (as asked) of ``model`` on the retention set, summed over ranks."""
        examples = self._encoded(tokenizer)
        mine = examples[distributed.rank()::distributed.world_size()]
        kl = "kl" in self.metrics
        sums = torch.zeros(3, dtype=torch.float64)  # nll, kl, answer tokens
        if mine:
            s = score_examples(model, mine, self.reference, kl, self.batch_size, pad_id(tokenizer))
            n = sum(s.tokens)
            sums += torch.tensor([s.loss * n, (s.kl or 0.0) * n, n], dtype=torch.float64)
        device = next(model.parameters()).device
        sums = distributed.all_reduce_sum(sums.to(device)).cpu() if distributed.world_size() > 1 else sums
        out = {"loss": float(sums[0] / sums[2]), "kl": float(sums[1] / sums[2])}
        return {m: out[m] for m in self.metrics}

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"start_loss": self.start_loss}

    def load_state_dict(self, tensors, meta, source: str) -> None:
        self.start_loss = meta.get("start_loss")

    # -- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_loss = None
        self._last_step = None
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._check_reference(model)
        checkpoint = self.resume_dir(args, state)
        if checkpoint is not None:  # the start model's retained loss, measured when the run began
            self.load_from(checkpoint)
        if self.max_loss_increase is not None and self.start_loss is None:
            self.start_loss = self.score(model, self._tokenizer(kwargs))["loss"]

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """Score once per evaluation step (several eval sets share it) and add the values to ``metrics``;
        evaluations without ``eval_`` keys (a WiSE-FT sweep's ``wise_ft_...``) are left alone."""
        if metrics is None or not any(k.startswith("eval_") for k in metrics) or model is None:
            return
        if self._last_step != state.global_step:
            self._check_reference(model)
            self.last = self.score(model, self._tokenizer(kwargs))
            self._last_step = state.global_step
            logs = {f"{self.prefix}_{k}": v for k, v in self.last.items()}
            over = self.over_budget()
            if over:
                logs[f"{self.prefix}_over_budget"] = 1.0
                warnings.warn(f"ForgettingCallback: at step {state.global_step} {over}", RuntimeWarning,
                              stacklevel=2)
                if self.on_budget == "stop":
                    control.should_training_stop = True
            if self.trainer is not None:
                self.trainer.log(logs)
            else:
                self.pending_logs.update(logs)
            self._logged = logs
        metrics.update(self._logged)

    def over_budget(self) -> str:
        """Why the last scores pass the budget ('' when they do not)."""
        why = []
        if self.max_loss_increase is not None and self.start_loss is not None:
            limit = self.start_loss + self.max_loss_increase
            if self.last["loss"] > limit:
                why.append(f"retained loss {self.last['loss']:.4f} > start {self.start_loss:.4f} + "
                           f"max_loss_increase {self.max_loss_increase:g}")
        if self.max_kl is not None and self.last["kl"] > self.max_kl:
            why.append(f"retained KL {self.last['kl']:.4f} > max_kl {self.max_kl:g}")
        return "; ".join(why)
