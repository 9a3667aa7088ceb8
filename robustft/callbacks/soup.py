"""Model soups of a run's own checkpoints at the end of training (uniform or greedy; docs/averaging.md).

Usage::

    cb = SoupCallback(last=4, method="greedy", eval_datasets={"id": val, "shifted": ood}, id_dataset="id")
    Trainer(..., args=TrainingArguments(..., save_strategy="steps", save_steps=200), callbacks=[cb]).train()

The candidates are the checkpoints this run saved (``checkpoint-<step>`` folders, recorded as they are
written and kept in the callback's state, so a resumed run soups the same ones), plus the final weights when
the last step was not saved. The soup is computed by :func:`robustft.interpolation.soup.soup_model` (the
tensors read once, each soup written in place into the live model). A soup is an average: it runs in the
averaging phase of the end-of-training actions, before WiSE-FT (docs/composition.md).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustft.callbacks.base import END_COPY_AVERAGE, END_SAVE_AVERAGE, RobustCallback
from robustft.checks import check_bool, check_id_dataset, check_number
from robustft.core import distributed
from robustft.core.checkpoint import atomic_output_dir
from robustft.interpolation.soup import SOUP_METHODS, SoupResult, soup_model, trainer_scorer

__all__ = ["SoupCallback"]

logger = logging.getLogger(__name__)

FINAL = "final"  # the name of the final weights among the candidates (when the last step was not saved)


class SoupCallback(RobustCallback):
    """The uniform or greedy soup (Wortsman et al. 2022) of this run's checkpoints, when training ends.

    Args:
        method: ``"uniform"`` (every candidate) or ``"greedy"`` (Alg. 1: by decreasing ID score, each kept
            if the soup's ID score does not drop); greedy needs ``eval_datasets``.
        last: soup only the latest ``last`` candidates (None: all the run saved).
        eval_datasets: name -> dataset scored with ``trainer.evaluate`` (greedy chooses on ``id_dataset``;
            with ``"uniform"`` the soup's scores are reported).
        id_dataset: the in-distribution set (default: the only one given).
        metric: key of the Trainer's metrics (``compute_metrics``), e.g. ``"accuracy"``, or ``"loss"``.
        greater_is_better: False for a loss-like metric.
        copy_to_model_at_end: leave the soup in the model (the end point of a WiSE-FT callback); else the
            model keeps its trained weights (the soup is only saved).
        save_dir: ``"auto"`` (``<output_dir>/soup``), a folder, or None: save the souped model there.
        save_report: write ``soup.json``/``.csv``/``.png`` into ``output_dir`` when scores were taken.
        progress: a progress bar over the evaluations.
    """

    state_name = "soup"

    def __init__(
        self,
        method: str = "uniform",
        last: int | None = None,
        eval_datasets: Mapping[str, Any] | None = None,
        id_dataset: str | None = None,
        metric: str = "accuracy",
        greater_is_better: bool = True,
        copy_to_model_at_end: bool = True,
        save_dir: str | os.PathLike | None = None,
        save_report: bool = True,
        progress: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if method not in SOUP_METHODS:
            raise ValueError(f"method: {method!r} is not one of {', '.join(SOUP_METHODS)}")
        if last is not None:
            last = check_number("last", last, low=1, integer=True)
        for option, value in (
            ("greater_is_better", greater_is_better),
            ("progress", progress),
            ("copy_to_model_at_end", copy_to_model_at_end),
            ("save_report", save_report),
        ):
            check_bool(option, value)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be the name of an evaluation metric, got {metric!r}")
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ValueError(f"save_dir must be 'auto', a folder or None, got {save_dir!r}")
        self.eval_datasets = dict(eval_datasets or {})
        if method == "greedy" and not self.eval_datasets:
            raise ValueError("method='greedy' chooses by score: give eval_datasets (and id_dataset)")
        id_dataset = check_id_dataset(self.eval_datasets, id_dataset)
        if not copy_to_model_at_end and save_dir is None:
            raise ValueError(
                "SoupCallback: with copy_to_model_at_end=False give save_dir, else the soup goes nowhere"
            )
        self.method, self.last = method, last
        self.id_dataset, self.metric, self.greater_is_better = id_dataset, metric, greater_is_better
        self.copy_to_model_at_end, self.save_dir = copy_to_model_at_end, save_dir
        self.save_report, self.progress = save_report, progress
        self.checkpoints: list[str] = []  # folders this run saved, in order
        self.result: SoupResult | None = None

    @property
    def end_phase(self) -> int:
        """Copied in: the end point from then on (phase 2); only saved: swapped in and out (phase 1)."""
        return END_COPY_AVERAGE if self.copy_to_model_at_end else END_SAVE_AVERAGE

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"checkpoints": list(self.checkpoints)}

    def load_state_dict(self, tensors, meta, source: str) -> None:
        saved = meta.get("checkpoints")
        if not isinstance(saved, list) or not all(isinstance(p, str) for p in saved):
            raise ValueError(f"{source}: the soup state has no list of checkpoints")
        self.checkpoints = list(saved)

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if hasattr(model, "peft_config"):
            raise ValueError(
                "SoupCallback: a PEFT run saves adapters; soup them after training with "
                "`robustft soup CHECKPOINT... --out DIR` (the exact mean of their deltas)"
            )
        if self.eval_datasets and self.trainer is None:
            raise ValueError("SoupCallback: scoring soups needs the Trainer; pass it with attach(trainer)")
        self.checkpoints = []
        resume = self.resume_dir(args, state)
        if resume is not None:
            self.load_from(resume)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder not in self.checkpoints:
            self.checkpoints.append(folder)
        super().on_save(args, state, control, **kwargs)  # the list, this folder included, in its state

    def candidates(self, state) -> tuple[list[str], list[str]]:
        """(names, sources) of the candidates: the saved checkpoints that still exist (latest ``last``), and
        ``FINAL`` (the live weights) when the last step was not saved."""
        found = [p for p in self.checkpoints if os.path.isdir(p)]
        missing = [p for p in self.checkpoints if p not in found]
        if missing:
            warnings.warn(
                f"SoupCallback: checkpoints deleted since they were saved (save_total_limit?) are "
                f"left out: {missing}",
                RuntimeWarning,
                stacklevel=2,
            )
        names = [os.path.basename(p) for p in found]
        if f"checkpoint-{state.global_step}" not in names:
            found.append(FINAL)
            names.append(FINAL)
        if self.last is not None:
            found, names = found[-self.last :], names[-self.last :]
        return names, found

    def end_of_training(self, args, state, control, model=None, **kwargs):
        """Soup the candidates into the model: kept there (copy), or saved and the trained weights back."""
        names, sources = self.candidates(state)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tensors = [live if s == FINAL else s for s in sources]
        score = None
        if self.eval_datasets:
            score = trainer_scorer(self.trainer, self.eval_datasets, self.metric)
        with self.without_robustft_wrappers("evaluate"):  # the soup, not an EMA swapped in
            self.result = soup_model(
                model,
                tensors,
                score,
                self.method,
                names=names,
                id_dataset=self.id_dataset or "id",
                greater_is_better=self.greater_is_better,
                metric=self.metric,
                progress=self.progress,
            )
        del tensors
        distributed.reshard(model)
        logger.info("soup of %s:\n%s", ", ".join(self.result.kept), self.result.table())
        logs = {"soup_size": float(len(self.result.kept)), "soup_candidates": float(len(names))}
        key = self.metric.removeprefix("eval_")
        logs.update({f"soup_{name}_{key}": value for name, value in self.result.soup.items()})
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            self.pending_logs.update(logs)
        if self.save_dir is not None:
            self._save_model(model, args)
        if self.save_report and self.result.soup and distributed.is_main_process():
            self.result.save(args.output_dir)
        if not self.copy_to_model_at_end:
            with torch.no_grad():
                for k, t in model.state_dict().items():
                    t.copy_(live[k])

    def _save_model(self, model, args) -> None:
        """The souped model into ``save_dir`` (``"auto"``: ``<output_dir>/soup``), replaced as a whole."""
        target = Path(args.output_dir) / "soup" if self.save_dir == "auto" else Path(self.save_dir)
        output_dir = Path(args.output_dir).resolve()
        if target.resolve() == output_dir or target.resolve() in output_dir.parents:
            raise ValueError(
                f"SoupCallback: save_dir {target} is or contains the Trainer's output_dir "
                f"{args.output_dir}; choose a folder of its own (default: <output_dir>/soup)"
            )
        if distributed.is_main_process():
            with atomic_output_dir(target, overwrite=True) as tmp:
                model.save_pretrained(tmp)
        distributed.barrier()
