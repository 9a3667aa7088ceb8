"""Momentum weight averaging callbacks: EMA, SWA, LAWA and momentum interpolation toward the start.

The maths lives in ``robustft.ops.averaging``; these classes decide when to update, swap the
average in for evaluation (and back), save it as a loadable model, and checkpoint it. An average exists
only from its first update on: before it, evaluation uses the live weights, and a run that ends without
any update warns and leaves the model (and the save folder) alone.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from robustft import distributed
from robustft.callbacks.base import END_COPY_AVERAGE, END_SAVE_AVERAGE, RobustCallback
from robustft.checkpoint import atomic_output_dir
from robustft.checks import as_real, check_bool, check_number, compile_patterns
from robustft.ops.averaging import ema_decay, ema_update_, mean_of, squared_distance, swa_update_
from robustft.params import (
    SelectionGuard,
    Snapshot,
    check_snapshot_spec,
    is_sharded,
    live_tensors,
    select_parameters,
    swapped_in,
    train_mode,
)

__all__ = [
    "EMACallback",
    "LAWACallback",
    "MomentumInterpolationCallback",
    "SWACallback",
    "recompute_batchnorm",
]


class _AveragingCallback(RobustCallback):
    """Shared life cycle: select parameters, keep an average, swap it in for eval, save, checkpoint."""

    #: metric prefix and default name of the saved model folder
    prefix = "avg"

    def __init__(
        self,
        *,
        update_every: int = 1,
        start_step: int = 0,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        buffers: bool = False,
        device: str = "same",
        dtype: str | torch.dtype | None = "auto",
        eval_with_average: bool = True,
        save_dir: str | None = "auto",
        copy_to_model_at_end: bool = False,
        log_distance: bool = True,
        resume_state_from: str | None = None,
        restart_if_missing: bool = False,
    ):
        super().__init__(resume_state_from=resume_state_from, restart_if_missing=restart_if_missing)
        update_every = check_number("update_every", update_every, low=1, integer=True)
        start_step = check_number("start_step", start_step, low=0, integer=True)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        for option, value in (("buffers", buffers), ("eval_with_average", eval_with_average),
                              ("copy_to_model_at_end", copy_to_model_at_end), ("log_distance", log_distance)):
            check_bool(option, value)
        check_snapshot_spec(device, dtype)
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise ValueError(f"save_dir must be 'auto', a folder or None, got {save_dir!r}")
        self.update_every = update_every
        self.start_step = start_step
        self.include, self.exclude, self.buffers = include, exclude, buffers
        self.device, self.dtype = device, dtype
        self.eval_with_average = eval_with_average
        self.save_dir = save_dir
        self.copy_to_model_at_end = copy_to_model_at_end
        self.log_distance = log_distance
        self.num_updates = 0
        self.params: dict[str, torch.Tensor] | None = None
        self.model: nn.Module | None = None
        self.guard: SelectionGuard | None = None

    # -- what subclasses provide ---------------------------------------------------------------
    def _init_average(self) -> None:
        """Allocate the average from the live weights (called once, at the first train begin)."""
        self.avg = Snapshot.of(self.params, device=self.device, dtype=self.dtype)

    def _update(self, step: int) -> None:
        raise NotImplementedError

    def average(self) -> Snapshot:
        """The averaged weights, in the order of ``self.params`` (an error before the first update)."""
        self._require_average()
        return self.avg

    def has_average(self) -> bool:
        """True from the first update on: before it the buffer holds the start weights, not an average."""
        return self.params is not None and self.num_updates > 0

    def _extra_logs(self) -> dict[str, float]:
        return {}

    # -- public helpers -------------------------------------------------------------------------
    def _require_setup(self) -> dict[str, torch.Tensor]:
        """The selected parameters, checked to still be the model's (a replaced module is an error)."""
        if self.params is None:
            raise RuntimeError(f"{type(self).__name__} has no average yet: train with it first")
        self.guard.check()
        return self.params

    def _require_average(self) -> None:
        if not self.has_average():
            raise RuntimeError(
                f"{type(self).__name__} has no average: no update has happened yet "
                f"(start_step={self.start_step}, update_every={self.update_every})"
            )

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Context in which the model holds the averaged weights (always restored on exit).

        ``with ema.averaged_weights(): trainer.evaluate()`` evaluates the average after training. The stored
        average is only read: an edit of the model inside the block (in place, an optimizer step) never
        reaches it, ``average()`` returns it unchanged inside, and the trained weights come back bit-exactly
        (kept in one more copy of the selected weights meanwhile). The block runs in the caller's grad mode
        (:func:`robustft.params.swapped_in`).
        """
        try:
            with swapped_in(self._require_setup(), self.average()):
                distributed.reshard(self.model)  # FSDP2: no stale gathered copy of the live weights
                yield
        finally:
            distributed.reshard(self.model)

    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average (what ``copy_to_model_at_end`` does)."""
        self.average().copy_to(self._require_setup())
        distributed.reshard(self.model)

    def distance(self) -> float:
        """‖average − live‖₂ over the selected tensors (summed over ranks when sharded)."""
        params = self._require_setup()
        sq = squared_distance(self.average().tensors, live_tensors(params))
        if is_sharded(params):
            sq = distributed.all_reduce_sum(sq)
        return math.sqrt(float(sq))

    # -- state ----------------------------------------------------------------------------------
    def sharded_state(self) -> bool:
        return self.params is not None and is_sharded(self.params)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.avg.state_dict(), {"num_updates": self.num_updates}

    def load_state_dict(self, tensors, meta, source):
        self.avg.load_state_dict(tensors, source=source)
        self.num_updates = int(meta["num_updates"])

    # -- Trainer events -------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        params = select_parameters(model, include=self.include, exclude=self.exclude, buffers=self.buffers)
        self.model = model
        self.guard = SelectionGuard(type(self).__name__, model, params)
        checkpoint = self.resume_dir(args, state)
        if self.params is None:
            self.params = params
            self._init_average()
        else:  # the same callback in a further train(): same tensors, maybe a new model object
            self.average()._check_names(params) if self.has_average() else None
            self.params = params
            if checkpoint is None:
                self._task_boundary()
        if checkpoint is not None:
            self.load_from(checkpoint)
        if self.eval_with_average:
            self._evaluate_with_average()

    def _evaluate_with_average(self) -> None:
        """Make the Trainer's evaluations during training run on the average, swapped back even on error.

        The Trainer has no "before evaluation" event, so its ``evaluate`` is wrapped (an instance
        attribute, removed at the end of training) in :meth:`averaged_weights`.
        """
        if self.trainer is None:
            warnings.warn(f"{type(self).__name__}: no Trainer found, evaluations use the live weights",
                          stacklevel=3)
            return

        def make_wrapper(original):
            def evaluate(*args, **kwargs):
                if not self.has_average():
                    return original(*args, **kwargs)
                with self.averaged_weights():
                    return original(*args, **kwargs)

            return evaluate

        self.wrap_method("evaluate", make_wrapper)

    def _task_boundary(self) -> None:
        """A further ``train()`` with the same callback (continual fine-tuning); nothing by default."""

    def on_step_end(self, args, state, control, **kwargs):
        if self._due(state.global_step):
            self._require_setup()  # the tensors updated from are still the model's
            self._update(state.global_step)
            self.num_updates += 1
        if control.should_log:
            logs = self._extra_logs()
            logs[f"{self.prefix}/num_updates"] = float(self.num_updates)
            if self.log_distance and self.has_average():
                logs[f"{self.prefix}/distance"] = self.distance()
            self.pending_logs.update(logs)

    @property
    def end_phase(self) -> int:
        """Saving an average (swapped in and out) comes before copying one in (docs/composition.md)."""
        return END_COPY_AVERAGE if self.copy_to_model_at_end else END_SAVE_AVERAGE

    def end_of_training(self, args, state, control, model=None, **kwargs):
        """Save the average as a model and/or copy it into the live weights; nothing without an update."""
        self.unwrap_method("evaluate")
        if self.params is None:
            return
        if not self.has_average():
            warnings.warn(
                f"{type(self).__name__}: training ended at step {state.global_step} before the first update "
                f"(start_step={self.start_step}, update_every={self.update_every}): there is no average, so "
                "the model keeps its trained weights and no average is saved",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._require_setup()
        with ExitStack() as stack:
            if not self.copy_to_model_at_end:
                stack.enter_context(self.averaged_weights())
            else:
                self.copy_to_model()
            self._finalize_weights(model, stack, kwargs)
            if self.save_dir is not None:
                self._save_model(model, args)

    def _finalize_weights(self, model, stack: ExitStack, kwargs: Mapping[str, Any]) -> None:
        """Last touch on the averaged model before it is saved (SWA recomputes BatchNorm here)."""

    def _save_model(self, model: nn.Module, args) -> None:
        """Write the averaged model to its folder atomically (``checkpoint.atomic_output_dir``: a temporary
        sibling renamed into place, the umask's modes), replacing a previous save there as a whole."""
        target = os.path.join(args.output_dir, self.prefix) if self.save_dir == "auto" else self.save_dir
        resolved, output_dir = Path(target).resolve(), Path(args.output_dir).resolve()
        if resolved == output_dir or resolved in output_dir.parents:  # on every rank, before gathering
            raise ValueError(
                f"{type(self).__name__}: save_dir {target} is or contains the Trainer's output_dir "
                f"{args.output_dir}; the average replaces its folder as a whole: choose a folder of its own "
                f"(default: <output_dir>/{self.prefix})"
            )
        # FSDP2 / ZeRO-3: every rank takes part in gathering the full (averaged) weights; the main process
        # writes them (FSDP2 through a full state dict, ZeRO-3 inside GatheredParameters)
        zero3 = distributed.deepspeed_stage(self.params) == 3
        state_dict = distributed.full_state_dict(model) if self.sharded_state() and not zero3 else None
        with distributed.gathered(model.parameters()):
            if distributed.is_main_process():
                with atomic_output_dir(target, overwrite=True) as tmp:
                    if hasattr(model, "save_pretrained"):
                        model.save_pretrained(tmp, state_dict=state_dict)
                    else:  # a plain nn.Module: its state dict as safetensors
                        state_dict = model.state_dict() if state_dict is None else state_dict
                        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                                  str(tmp / "model.safetensors"))
        distributed.barrier()


class EMACallback(_AveragingCallback):
    """Exponential moving average of the weights: θ_ema ← β·θ_ema + (1−β)·θ after each update step.

    The first update copies the live weights (as ``torch.optim.swa_utils.AveragedModel``); with
    ``warmup=True`` the decay at the k-th update is min(β, 1 − (1 + k/γ)^−p) as in timm.

    Args:
        decay: β in (0, 1).
        warmup, warmup_gamma, warmup_power: decay warmup (timm's ModelEmaV3 formula).
        update_every: update every N optimizer steps; start_step: first step that updates.
        include, exclude: regex name patterns (default: all trainable parameters); buffers: average
            floating buffers too (BatchNorm statistics).
        device: ``"same"`` or ``"cpu"`` for the shadow.
        dtype: shadow dtype (``"auto"``: float32 for 16-bit weights, else the weight's dtype).
        eval_with_ema: evaluate with the EMA weights during training (swapped in and back).
        save_dir: where the EMA model is saved at the end (``"auto"``: ``<output_dir>/ema``; None: not saved).
        copy_to_model_at_end: leave the EMA weights in the model when training ends.
    """

    prefix = "ema"
    state_name = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        eval_with_ema: bool = True,
        **kwargs: Any,
    ):
        decay = check_number("decay", decay, low=0.0, high=1.0, low_open=True, high_open=True)
        check_bool("warmup", warmup)
        warmup_gamma = check_number("warmup_gamma", warmup_gamma, low=0.0, low_open=True)
        warmup_power = check_number("warmup_power", warmup_power, low=0.0, low_open=True)
        check_bool("eval_with_ema", eval_with_ema)
        super().__init__(eval_with_average=eval_with_ema, **kwargs)
        self.decay = decay
        self.warmup, self.warmup_gamma, self.warmup_power = warmup, warmup_gamma, warmup_power

    def current_decay(self) -> float:
        return ema_decay(self.num_updates, self.decay, self.warmup, self.warmup_gamma, self.warmup_power)

    def _update(self, step: int) -> None:
        live = live_tensors(self.params)
        if self.num_updates == 0:
            swa_update_(self.avg.tensors, live, 0)  # first update copies, as AveragedModel does
        else:
            ema_update_(self.avg.tensors, live, self.current_decay())

    def _extra_logs(self) -> dict[str, float]:
        return {f"{self.prefix}/decay": self.current_decay()}


def _start_step(start: int | float, max_steps: int) -> int:
    """An int is a step; a float in [0, 1) a fraction of the run's optimizer steps."""
    if isinstance(start, float):
        return int(math.floor(start * max_steps))
    return start


class SWACallback(_AveragingCallback):
    """Stochastic weight averaging: equal-weight mean of the weights taken every N steps from a start.

    θ_swa ← θ_swa + (θ − θ_swa)/(n+1) (Izmailov et al., 2018, "Averaging Weights Leads to Wider
    Optima"). ``start`` is a step (int) or a fraction of the run (float in [0, 1)). BatchNorm
    statistics are recomputed for the averaged weights on the training data before they are
    saved or copied, as ``torch.optim.swa_utils.update_bn`` does.
    """

    prefix = "swa"
    state_name = "swa"

    def __init__(self, start: int | float = 0.75, *, eval_with_swa: bool = True, update_bn: bool = True,
                 **kwargs: Any):
        if isinstance(as_real(start), float):
            start = check_number("start (a fraction of the run)", start, low=0.0, high=1.0, high_open=True)
        else:
            start = check_number("start (a step)", start, low=0, integer=True)
        if "start_step" in kwargs:
            raise ValueError("SWACallback: give the first averaged step as start=..., not start_step")
        check_bool("eval_with_swa", eval_with_swa)
        check_bool("update_bn", update_bn)
        super().__init__(eval_with_average=eval_with_swa, **kwargs)
        self.start = start
        self.update_bn = update_bn

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = _start_step(self.start, state.max_steps)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _update(self, step: int) -> None:
        swa_update_(self.avg.tensors, live_tensors(self.params), self.num_updates)

    def _finalize_weights(self, model, stack, kwargs):
        loader = kwargs.get("train_dataloader")
        if self.update_bn and loader is not None and _batchnorms(model):
            if not self.copy_to_model_at_end:
                stack.enter_context(_buffers_restored(model))
            recompute_batchnorm(model, loader)
            # each rank saw its own shard of the data: the statistics are averaged so every rank (and the
            # saved model) holds the same ones; with equal shards the mean is that of one pass over all data
            for bn in _batchnorms(model):
                for buffer in (bn.running_mean, bn.running_var):
                    if buffer is not None:
                        distributed.all_reduce_mean(buffer)


class LAWACallback(_AveragingCallback):
    """Latest weight averaging: the mean of the last k snapshots, taken every N steps.

    θ_lawa = (1/k)·Σ_{i<k} θ_{t−i·N} (Kaddour, 2022, "Stop Wasting My Time! Saving Days of
    ImageNet and BERT Training with Latest Weight Averaging"). Holds k copies of the weights.
    """

    prefix = "lawa"
    state_name = "lawa"

    def __init__(self, k: int = 5, *, update_every: int = 100, eval_with_lawa: bool = True, **kwargs: Any):
        k = check_number("k", k, low=1, integer=True)
        check_bool("eval_with_lawa", eval_with_lawa)
        super().__init__(update_every=update_every, eval_with_average=eval_with_lawa, **kwargs)
        self.k = k
        self.snapshots: list[Snapshot] = []

    def _init_average(self) -> None:
        self.snapshots = []
        self._mean: Snapshot | None = None

    def has_average(self) -> bool:
        return self.params is not None and bool(self.snapshots)

    def _update(self, step: int) -> None:
        if len(self.snapshots) == self.k:
            oldest = self.snapshots.pop(0)
            oldest.copy_from(self.params)  # reuse the oldest buffer
            self.snapshots.append(oldest)
        else:
            self.snapshots.append(Snapshot.of(self.params, device=self.device, dtype=self.dtype))

    def average(self) -> Snapshot:
        self._require_average()
        if self._mean is None:
            self._mean = Snapshot.zeros_like(self.snapshots[0])
        mean_of(self._mean.tensors, [s.tensors for s in self.snapshots])
        return self._mean

    def state_dict(self):
        tensors: dict[str, torch.Tensor] = {}
        for i, snap in enumerate(self.snapshots):
            tensors.update(snap.state_dict(prefix=f"{i}."))
        return tensors, {"num_updates": self.num_updates, "num_snapshots": len(self.snapshots)}

    def load_state_dict(self, tensors, meta, source):
        self.snapshots = []
        for i in range(int(meta["num_snapshots"])):
            snap = Snapshot.of(self.params, device=self.device, dtype=self.dtype)
            snap.load_state_dict(tensors, prefix=f"{i}.", source=source)
            self.snapshots.append(snap)
        self.num_updates = int(meta["num_updates"])


class MomentumInterpolationCallback(_AveragingCallback):
    """Slow weights that follow the trained ones by momentum, starting from the pretrained model.

    θ_slow ← τ·θ_slow + (1−τ)·θ every N steps, with θ_slow = θ_pretrained at the first
    ``train()`` (Stojanovski et al., 2022, "Momentum-based Weight Interpolation of Strong
    Zero-Shot Models for Continual Learning"). Keep one instance across the tasks of a continual
    run: each further ``train()`` is a task boundary, where the fast (trained) weights are reset
    to the slow ones if ``reset_fast_at_task_boundary``. Evaluation uses the slow weights.
    """

    prefix = "momentum"
    state_name = "momentum_interpolation"

    def __init__(self, momentum: float = 0.99, *, reset_fast_at_task_boundary: bool = True,
                 eval_with_slow: bool = True, **kwargs: Any):
        momentum = check_number("momentum", momentum, low=0.0, high=1.0, low_open=True, high_open=True)
        check_bool("reset_fast_at_task_boundary", reset_fast_at_task_boundary)
        check_bool("eval_with_slow", eval_with_slow)
        super().__init__(eval_with_average=eval_with_slow, **kwargs)
        self.momentum = momentum
        self.reset_fast_at_task_boundary = reset_fast_at_task_boundary
        self.task = 0

    def _update(self, step: int) -> None:
        ema_update_(self.avg.tensors, live_tensors(self.params), self.momentum)

    def _task_boundary(self) -> None:
        self.task += 1
        if self.reset_fast_at_task_boundary:  # the slow weights: θ_pretrained until their first update
            self.guard.check()
            self.avg.copy_to(self.params)
            distributed.reshard(self.model)

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "task": self.task}

    def load_state_dict(self, tensors, meta, source):
        super().load_state_dict(tensors, meta, source)
        self.task = int(meta["task"])

    def _extra_logs(self) -> dict[str, float]:
        return {"momentum/task": float(self.task)}


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer on exit (recomputing statistics is a temporary change too)."""
    saved = {n: b.clone() for n, b in model.named_buffers() if b is not None}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader`` (as swa_utils.update_bn).

    Batches may be dicts (Hugging Face style, passed as ``model(**batch)``), tuples or tensors.
    """
    bns = _batchnorms(model)
    if not bns:
        return
    momenta = {}
    for bn in bns:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # cumulative average over the pass
    device = next(model.parameters()).device
    try:
        with train_mode(model, True):
            for batch in loader:
                if isinstance(batch, Mapping):
                    model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                elif isinstance(batch, (list, tuple)):
                    model(batch[0].to(device))
                else:
                    model(batch.to(device))
    finally:
        for bn, m in momenta.items():
            bn.momentum = m
