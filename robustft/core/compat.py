"""Every use of another library's private state, and every walk of the call stack, in one place.

Checked against: transformers 5.24.0, accelerate 1.15.0, deepspeed 0.19.8, torch 2.13.0, trl 1.16.0.
``tests/core/test_compat.py`` has one test per function below that fails, naming the private attribute,
when an installed release no longer has it. Update both together.

Only the standard library and torch are imported at module level (this module sits at the
params/distributed layer); transformers and DeepSpeed objects are handed in by the caller.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "CHECKED_AGAINST",
    "TRL_REF_ADAPTER",
    "UNKNOWN_RESUME",
    "caller_self",
    "clip_grad_norm",
    "clip_grad_norm_name",
    "grad_scaler_state",
    "release_zero3_gathered",
    "restart_lr_schedule",
    "set_scheduler_last_lr",
    "relink_zero_optimizer_states",
    "reset_grad_scaler",
    "restore_grad_scaler",
    "trainer_loss_accumulation",
    "trainer_resume_checkpoint",
    "training_loop_running",
    "trl_bookkeeping_kept",
    "trl_reference_model",
]

CHECKED_AGAINST = {
    "transformers": "5.24.0",
    "accelerate": "1.15.0",
    "deepspeed": "0.19.8",
    "torch": "2.13.0",
    "trl": "1.16.0",
}


def _missing(owner: str, name: str, library: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"robustft.core.compat: {owner} has no {name!r} "
        f"(checked against {library} {CHECKED_AGAINST[library]}); "
        f"{what} cannot work with this version"
    )


# -- the call stack -----------------------------------------------------------------------------------
def caller_self(kind: type, depth: int = 12) -> Any:
    """The nearest ``self`` of type ``kind`` up the call stack, or None.

    The Trainer hands callbacks neither itself nor its callback handler; both are the ``self`` (the
    frame local of that name) of a frame that is running the current event, so they are found there.
    """
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, kind):
            return owner
    return None


#: what :func:`trainer_resume_checkpoint` returns when no training loop is on the call stack
UNKNOWN_RESUME = object()


def trainer_resume_checkpoint(kind: type) -> str | None | object:
    """The checkpoint folder the running ``kind.train`` (a Trainer class) resumes from: None when it starts
    afresh, :data:`UNKNOWN_RESUME` when no training loop is on the call stack.

    transformers keeps the folder (``resume_from_checkpoint=PATH``, or ``True`` already resolved to the
    last checkpoint of ``output_dir``) only as the local ``resume_from_checkpoint`` of
    ``Trainer._inner_training_loop``, the frame that fires ``on_train_begin``; it is read there.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), kind):
            folder = frame.f_locals.get("resume_from_checkpoint")
            return None if folder is None else os.fspath(folder)
        frame = frame.f_back
    return UNKNOWN_RESUME


def training_loop_running(trainer: Any) -> bool:
    """True while ``trainer``'s training loop (``Trainer._inner_training_loop``) is on the call stack.

    The Trainer calls no callback when ``train()`` raises; what a callback attached for one run (a
    wrapped method) asks this to find out, on its next call, that the run is over.
    """
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop" and frame.f_locals.get("self") is trainer:
            return True
        frame = frame.f_back
    return False


# -- transformers / TRL Trainer -----------------------------------------------------------------------
def clip_grad_norm(trainer: Any, model: torch.nn.Module) -> None:
    """Clip (and unscale) the gradients as the Trainer's own step does (``Trainer._clip_grad_norm``)."""
    clip = getattr(trainer, "_clip_grad_norm", None)
    if clip is None:
        raise _missing(type(trainer).__name__, "_clip_grad_norm", "transformers", "SAMCallback's replay")
    clip(model)


def clip_grad_norm_name(trainer: Any) -> str:
    """The name of the Trainer method that unscales and clips the gradients before
    ``on_pre_optimizer_step`` (``Trainer._clip_grad_norm``), for a callback that must act just before it."""
    if not callable(getattr(trainer, "_clip_grad_norm", None)):
        raise _missing(type(trainer).__name__, "_clip_grad_norm", "transformers", "the frozen entries' "
                       "gradient mask before clipping (SparseUpdateCallback, LPFTCallback)")
    return "_clip_grad_norm"


def restart_lr_schedule(trainer: Any, num_training_steps: int, state: dict | None = None) -> Any:
    """Give the Trainer a fresh learning-rate schedule over ``num_training_steps`` optimizer steps from now
    (the kind, warmup and kwargs of its ``TrainingArguments``, built by its own ``create_scheduler``); with
    ``state`` (a ``state_dict`` of such a schedule) the schedule continues from there. Returns it.

    The Trainer builds one schedule over the whole run and rebuilds it only when it made it itself
    (``_created_lr_scheduler``); a scheduler the user passed in cannot be rebuilt and is refused. The
    training loop reads ``trainer.lr_scheduler`` at every step and hands callbacks the callback handler's
    reference, so both are replaced.
    """
    if not hasattr(trainer, "_created_lr_scheduler"):
        raise _missing(type(trainer).__name__, "_created_lr_scheduler", "transformers",
                       "a fresh learning-rate schedule per stage (LPFTCallback(two_stage=True))")
    if not trainer._created_lr_scheduler:
        raise ValueError("two_stage: the Trainer was given its own lr scheduler (optimizers=(..., "
                         "scheduler)); a fresh schedule per stage is built from the TrainingArguments, so "
                         "let the Trainer build it")
    optimizer = trainer.optimizer
    trainer.lr_scheduler = None
    scheduler = trainer.create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
    if state is not None:
        scheduler.load_state_dict(state)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the rate of the step it continues from (its init set that of step 0)
    trainer.callback_handler.lr_scheduler = scheduler
    return scheduler


def set_scheduler_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """Make ``scheduler.get_last_lr()`` (what the Trainer logs as ``learning_rate``) return ``lrs``: a
    callback that sets the optimizer's rates itself (SWACallback's SWALR) keeps the logged rate true.
    """
    if scheduler is None:
        return
    if not hasattr(scheduler, "_last_lr"):
        raise _missing(type(scheduler).__name__, "_last_lr", "torch",
                       "the learning rate the Trainer logs while SWACallback(swa_lr=...) sets it")
    scheduler._last_lr = list(lrs)


def trainer_loss_accumulation(trainer: Any, num_items_in_batch: Any) -> tuple[int, int]:
    """(what the Trainer's ``training_step`` divides ``compute_loss``'s loss by, micro-batches in this
    optimizer step).

    transformers 5.24 divides by ``current_gradient_accumulation_steps`` (set per optimizer step, so a short
    last step counts its own micro-batches) unless the loss counts as already scaled for accumulation:
    ``loss_is_scaled_for_ga`` when set, else a model that accepts loss kwargs and got ``num_items_in_batch``,
    or a ``compute_loss_func``; then it divides by nothing (1).
    """
    for name in ("loss_is_scaled_for_ga", "model_accepts_loss_kwargs", "compute_loss_func",
                 "current_gradient_accumulation_steps"):
        if not hasattr(trainer, name):
            raise _missing(type(trainer).__name__, name, "transformers", "the anchor penalties' loss scaling")
    steps = int(trainer.current_gradient_accumulation_steps)
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return (1 if scaled else steps), steps


@contextmanager
def trl_bookkeeping_kept(trainer: Any) -> Iterator[None]:
    """Put TRL's per-batch bookkeeping (``_metrics``, ``_total_train_tokens``) back as it was on exit.

    TRL trainers count tokens and collect per-batch metrics inside ``compute_loss``; a replay of the
    same batches (exact SAM) is not new data. Plain Trainers have neither attribute: nothing to do.
    """
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        yield
    finally:
        if metrics is not None:
            trainer._metrics = metrics
        if tokens is not None:
            trainer._total_train_tokens = tokens


#: the adapter TRL's DPO/GRPO/RLOO trainers activate for the reference forward of a PEFT policy when it exists
#: (``use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)``; otherwise they
#: disable the adapters and use the base model)
TRL_REF_ADAPTER = "ref"


def trl_reference_model(trainer: Any) -> torch.nn.Module | None:
    """The separate reference model a TRL trainer computes reference log-probs with (``trainer.ref_model``,
    unwrapped), or None when it has none (a PEFT policy, or no reference in use)."""
    if not hasattr(trainer, "ref_model"):
        raise _missing(type(trainer).__name__, "ref_model", "trl", "EMAReferenceCallback (a TRL trainer "
                       "with a reference model: DPOTrainer, GRPOTrainer, RLOOTrainer)")
    ref = trainer.ref_model
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(ref) if ref is not None and accelerator is not None else ref

# -- torch GradScaler ---------------------------------------------------------------------------------
def _scaler_states(scaler: Any) -> dict:
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None or getattr(torch.amp.grad_scaler, "_refresh_per_optimizer_state", None) is None:
        raise _missing(type(scaler).__name__, "_per_optimizer_states", "torch", "SAMCallback with fp16")
    return states


def grad_scaler_state(scaler: Any) -> dict | None:
    """A copy of the GradScaler's per-optimizer state (unscaled yet? inf found?), None without a scaler."""
    if scaler is None:
        return None
    return {key: dict(value) for key, value in _scaler_states(scaler).items()}


def reset_grad_scaler(scaler: Any) -> None:
    """Forget that this step's gradients were unscaled, so ``unscale_`` (and its inf check) runs afresh."""
    if scaler is not None:
        _scaler_states(scaler).clear()


def restore_grad_scaler(scaler: Any, state: dict | None) -> None:
    """Put back a state taken by :func:`grad_scaler_state`."""
    if scaler is None or state is None:
        return
    states = _scaler_states(scaler)
    states.clear()
    states.update({key: dict(value) for key, value in state.items()})


# -- DeepSpeed ----------------------------------------------------------------------------------------
def release_zero3_gathered(param: torch.Tensor | None) -> None:
    """Release every parameter a ZeRO-3 engine still holds gathered (``param._z3_optimizer``, set by
    the engine on each partitioned parameter, ``.empty_partition_cache()``); no-op for other tensors."""
    optimizer = getattr(param, "_z3_optimizer", None)
    if optimizer is not None:
        optimizer.empty_partition_cache()  # releases every gathered parameter (no gc, unlike the engine's)


def relink_zero_optimizer_states(zero_optimizer: Any) -> None:
    """Link every parameter of a ZeRO-1/2 optimizer to its optimizer state again.

    deepspeed 0.19.8 links parameters to their optimizer state once, right after the first param
    group's first step (``_lazy_init_hp_params_optimizer_state`` guarded by
    ``_hp_optimizer_states_linked``), so the parameters of later groups (the Trainer's no-decay group)
    stay unlinked and ``safe_get_full_optimizer_state`` raises for them; linking again only makes views.
    """
    if not hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        return  # not a ZeRO-1/2 (or bf16) optimizer: nothing is linked lazily
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
