"""Momentum weight averaging callbacks: EMA, SWA, LAWA and momentum interpolation toward the start.

The maths lives in ``robustft.ops.averaging``; these classes decide when to update, swap the
average in for evaluation (and back), save it as a loadable model, and checkpoint it. An average exists
only from its first update on: before it, evaluation uses the live weights, and a run that ends without
any update warns and leaves the model (and the save folder) alone.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from robustft.callbacks.base import END_COPY_AVERAGE, END_SAVE_AVERAGE, RobustCallback
from robustft.checks import as_real, check_bool, check_number, compile_patterns
from robustft.core import distributed
from robustft.core.checkpoint import atomic_output_dir
from robustft.core.compat import set_scheduler_last_lr
from robustft.core.params import (
    SelectionGuard,
    Snapshot,
    check_snapshot_spec,
    is_sharded,
    live_tensors,
    select_parameters,
    swapped_in,
    train_mode,
)
from robustft.ops.averaging import (
    bema_coefficients,
    bema_update_,
    ema_decay,
    ema_update_,
    half_life_decay,
    mean_of,
    squared_distance,
    swa_update_,
    swalr_lr,
)

__all__ = [
    "BEMACallback",
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
        (:func:`robustft.core.params.swapped_in`).
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


_HALF_LIFE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*(ba|tok)\s*$")


def parse_half_life(half_life: str | int | float) -> tuple[float, str]:
    """A half-life as (amount, unit): a number of optimizer steps, or Composer's "10ba" / "1000tok"."""
    if isinstance(half_life, str):
        match = _HALF_LIFE.match(half_life)
        if match is None:
            raise ValueError(f"half_life must be a number of steps or a string like '10ba' (optimizer steps) "
                             f"or '1000tok' (input tokens), got {half_life!r}")
        amount, unit = float(match.group(1)), match.group(2)
        check_number("half_life", amount, low=0.0, low_open=True)
        return amount, unit
    return float(check_number("half_life", half_life, low=0.0, low_open=True)), "ba"


class EMACallback(_AveragingCallback):
    """Exponential moving average of the weights: θ_ema ← β·θ_ema + (1−β)·θ after each update step.

    The first update copies the live weights (as ``torch.optim.swa_utils.AveragedModel``); with
    ``warmup=True`` the decay at the k-th update is min(β, 1 − (1 + k/γ)^−p) as in timm. With
    ``half_life`` instead of ``decay`` the decay of an update is 0.5^(Δ/h), Δ the optimizer steps ("10ba")
    or input tokens ("1000tok", the Trainer's ``num_input_tokens_seen``) since the previous update, as
    Composer's EMA ``half_life``: a term's weight halves every h steps or tokens.

    Strength: β averages over about 1/(1−β) updates; common values (0.999-0.9999, timm and Polyak-style
    averaging) assume thousands of steps. In a short fine-tuning run the first update's weights (near the
    start) keep weight β^(updates−1) (0.99 over 26 steps: 0.78), so the EMA is then close to the start.
    Sweep β with :func:`robustft.analysis.strength.strength_sweep` (``copy_to_model_at_end=True`` so the
    run's end point is the average).

    Args:
        decay: β in (0, 1) (default 0.999 when ``half_life`` is not given).
        half_life: a number of optimizer steps, or "Nba" (steps) / "Ntok" (tokens; needs
            ``TrainingArguments(include_num_input_tokens_seen=True)``); excludes ``decay`` and ``warmup``.
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
        decay: float | None = None,
        *,
        half_life: str | int | float | None = None,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        eval_with_ema: bool = True,
        **kwargs: Any,
    ):
        if half_life is not None and (decay is not None or warmup):
            raise ValueError("EMACallback: give either decay (with warmup) or half_life, not both")
        self.half_life = parse_half_life(half_life) if half_life is not None else None
        decay = 0.999 if decay is None else decay
        decay = check_number("decay", decay, low=0.0, high=1.0, low_open=True, high_open=True)
        check_bool("warmup", warmup)
        warmup_gamma = check_number("warmup_gamma", warmup_gamma, low=0.0, low_open=True)
        warmup_power = check_number("warmup_power", warmup_power, low=0.0, low_open=True)
        check_bool("eval_with_ema", eval_with_ema)
        super().__init__(eval_with_average=eval_with_ema, **kwargs)
        self.decay = decay
        self.warmup, self.warmup_gamma, self.warmup_power = warmup, warmup_gamma, warmup_power
        self.last_mark = 0.0  # steps or tokens at the previous update (half_life)
        self.now = 0.0  # steps or tokens at the current step (half_life)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.half_life is not None and self.half_life[1] == "tok" \
                and args.include_num_input_tokens_seen in ("no", False):
            raise ValueError(f"EMACallback(half_life={self.half_life[0]:g} tokens) counts the input tokens "
                             "the Trainer has seen: set TrainingArguments(include_num_input_tokens_seen=True)"
                             )
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.half_life is not None:
            self.now = float(state.num_input_tokens_seen if self.half_life[1] == "tok" else state.global_step)
        super().on_step_end(args, state, control, **kwargs)

    def current_decay(self) -> float:
        """The decay of the next update (``half_life``: for the steps or tokens since the previous one)."""
        if self.half_life is not None:
            return half_life_decay(self.now - self.last_mark, self.half_life[0])
        return ema_decay(self.num_updates, self.decay, self.warmup, self.warmup_gamma, self.warmup_power)

    def _update(self, step: int) -> None:
        live = live_tensors(self.params)
        if self.num_updates == 0:
            swa_update_(self.avg.tensors, live, 0)  # first update copies, as AveragedModel does
        else:
            ema_update_(self.avg.tensors, live, self.current_decay())
        self.last_mark = self.now

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "last_mark": self.last_mark}

    def load_state_dict(self, tensors, meta, source):
        super().load_state_dict(tensors, meta, source)
        self.last_mark = float(meta.get("last_mark", 0.0))

    def _extra_logs(self) -> dict[str, float]:
        return {f"{self.prefix}/decay": self.current_decay()}


class BEMACallback(_AveragingCallback):
    """Bias-corrected EMA (BEMA): θ' = EMA_t + α_t·(θ_t − θ_0), the EMA's lag removed; TRL's BEMACallback.

    Block et al. 2025, "EMA without the lag: bias-corrected iterate averaging". Every ``update_freq`` steps
    after ``update_after``: β_t = max((ρ + γt)^−κ, β_min), EMA_t = (1 − β_t)·EMA + β_t·θ_t, α_t =
    (ρ + γt)^−η, with t the global step (as TRL). θ_0 and the EMA are the weights at step ``update_after``
    (at the start of training when it is 0). Same parameters and meaning as ``trl.BEMACallback``; the
    average is what TRL saves under ``<output_dir>/bema``. Holds three copies of the trained weights
    (θ_0, the EMA and the corrected average), local shards under FSDP.

    Args:
        update_freq: φ, update every N steps after ``update_after``.
        ema_power: κ (0 disables the EMA: β = 1). bias_power: η (0: α = 1).
        lag: ρ. update_after: τ, the burn-in step where θ_0 is taken. multiplier: γ.
        min_ema_multiplier: a floor on β_t.
        eval_with_bema, include, exclude, buffers, device, dtype, save_dir, copy_to_model_at_end: as
            :class:`EMACallback` (``save_dir="auto"``: ``<output_dir>/bema``).
    """

    prefix = "bema"
    state_name = "bema"

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2,
                 lag: float = 10, update_after: int = 0, multiplier: float = 1.0,
                 min_ema_multiplier: float = 0.0, *, eval_with_bema: bool = True, **kwargs: Any):
        for option, ours in (("update_every", "update_freq"), ("start_step", "update_after")):
            if option in kwargs:
                raise ValueError(f"BEMACallback: give {ours}=... (TRL's name), not {option}")
        update_freq = check_number("update_freq", update_freq, low=1, integer=True)
        update_after = check_number("update_after", update_after, low=0, integer=True)
        self.ema_power = check_number("ema_power", ema_power, low=0.0)
        self.bias_power = check_number("bias_power", bias_power, low=0.0)
        self.lag = check_number("lag", lag, low=0.0)
        self.multiplier = check_number("multiplier", multiplier, low=0.0)
        self.min_ema_multiplier = check_number("min_ema_multiplier", min_ema_multiplier, low=0.0, high=1.0)
        if not self.lag + self.multiplier > 0:
            raise ValueError("BEMACallback: lag + multiplier must be > 0 (ρ + γt, the age of an update)")
        check_bool("eval_with_bema", eval_with_bema)
        super().__init__(update_every=update_freq, start_step=update_after, eval_with_average=eval_with_bema,
                         **kwargs)
        self.coefficients = (1.0, 1.0)

    def _init_average(self) -> None:
        super()._init_average()
        self.theta0 = Snapshot.of(self.params, device=self.device, dtype=self.dtype)
        self.ema = Snapshot.of(self.params, device=self.device, dtype=self.dtype)

    def _due(self, step: int) -> bool:
        return step > self.start_step and (step - self.start_step) % self.update_every == 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start_step:  # the burn-in ends: θ_0 and the EMA start here
            self.theta0.copy_from(self._require_setup())
            self.ema.copy_from(self.params)
        super().on_step_end(args, state, control, **kwargs)

    def _update(self, step: int) -> None:
        self.coefficients = bema_coefficients(
            step, ema_power=self.ema_power, bias_power=self.bias_power, lag=self.lag,
            multiplier=self.multiplier, min_ema_multiplier=self.min_ema_multiplier)
        beta, alpha = self.coefficients
        bema_update_(self.avg.tensors, self.ema.tensors, self.theta0.tensors, live_tensors(self.params),
                     beta, alpha)

    def state_dict(self):
        tensors = {**self.avg.state_dict(prefix="bema."), **self.ema.state_dict(prefix="ema."),
                   **self.theta0.state_dict(prefix="theta0.")}
        return tensors, {"num_updates": self.num_updates}

    def load_state_dict(self, tensors, meta, source):
        self.avg.load_state_dict(tensors, prefix="bema.", source=source)
        self.ema.load_state_dict(tensors, prefix="ema.", source=source)
        self.theta0.load_state_dict(tensors, prefix="theta0.", source=source)
        self.num_updates = int(meta["num_updates"])

    def _extra_logs(self) -> dict[str, float]:
        beta, alpha = self.coefficients
        return {f"{self.prefix}/beta": beta, f"{self.prefix}/alpha": alpha}


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

    With ``swa_lr`` the callback takes the learning rate over from the first averaged step on, as
    ``torch.optim.swa_utils.SWALR(optimizer, swa_lr, anneal_epochs, anneal_strategy)`` stepped once per
    optimizer step instead of the Trainer's schedule: from the rate of that step it anneals to ``swa_lr``
    ("cos" or "linear") over ``anneal_epochs`` optimizer steps, then stays there. ``swa_lr`` is a float
    or one per optimizer parameter group. The Trainer's logged ``learning_rate`` is the rate used.
    """

    prefix = "swa"
    state_name = "swa"

    def __init__(self, start: int | float = 0.75, *, eval_with_swa: bool = True, update_bn: bool = True,
                 swa_lr: float | list[float] | None = None, anneal_epochs: int = 10,
                 anneal_strategy: str = "cos", **kwargs: Any):
        if isinstance(as_real(start), float):
            start = check_number("start (a fraction of the run)", start, low=0.0, high=1.0, high_open=True)
        else:
            start = check_number("start (a step)", start, low=0, integer=True)
        if "start_step" in kwargs:
            raise ValueError("SWACallback: give the first averaged step as start=..., not start_step")
        check_bool("eval_with_swa", eval_with_swa)
        check_bool("update_bn", update_bn)
        if swa_lr is not None:
            values = swa_lr if isinstance(swa_lr, (list, tuple)) else [swa_lr]
            if not values:
                raise ValueError("swa_lr: an empty list")
            swa_lr = [check_number("swa_lr", v, low=0.0) for v in values]
        anneal_epochs = check_number("anneal_epochs", anneal_epochs, low=0, integer=True)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        super().__init__(eval_with_average=eval_with_swa, **kwargs)
        self.start = start
        self.update_bn = update_bn
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = swa_lr, anneal_epochs, anneal_strategy
        self.lr_from: int | None = None  # the first step of the SWALR schedule (the first averaged step)
        self.start_lrs: list[float] | None = None  # the rates of that step, per parameter group

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = _start_step(self.start, state.max_steps)
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _swa_lrs(self, optimizer) -> list[float]:
        groups = len(optimizer.param_groups)
        if len(self.swa_lr) == 1:
            return self.swa_lr * groups
        if len(self.swa_lr) != groups:
            raise ValueError(f"swa_lr: {len(self.swa_lr)} rates for {groups} optimizer parameter groups")
        return self.swa_lr

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        super().on_step_begin(args, state, control, optimizer=optimizer, **kwargs)
        if self.swa_lr is not None and self.lr_from is None and self._due(state.global_step + 1):
            self._swa_lrs(optimizer)  # checked before the schedule starts
            self.lr_from = state.global_step + 1
            self.start_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def on_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_optimizer_step(args, state, control, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                  **kwargs)
        if self.lr_from is not None:  # the Trainer logs the scheduler's last rate: make it the one used
            set_scheduler_last_lr(lr_scheduler, [g["lr"] for g in optimizer.param_groups])

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        super().on_step_end(args, state, control, optimizer=optimizer, **kwargs)
        if self.lr_from is not None:  # after the Trainer's scheduler stepped: the rate of the next step
            steps = state.global_step - self.lr_from + 1
            for group, lr0, swa_lr in zip(optimizer.param_groups, self.start_lrs, self._swa_lrs(optimizer)):
                group["lr"] = swalr_lr(lr0, swa_lr, steps, self.anneal_epochs, self.anneal_strategy)

    def state_dict(self):
        tensors, meta = super().state_dict()
        return tensors, {**meta, "lr_from": self.lr_from, "start_lrs": self.start_lrs}

    def load_state_dict(self, tensors, meta, source):
        super().load_state_dict(tensors, meta, source)
        self.lr_from, self.start_lrs = meta.get("lr_from"), meta.get("start_lrs")

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
