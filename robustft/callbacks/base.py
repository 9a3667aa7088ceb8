"""What every robustft callback shares: metrics into the Trainer's logs, and state beside checkpoints.

A subclass implements ``state_dict()``/``load_state_dict()`` (tensors + small JSON meta) and
gets save-on-checkpoint and load-on-resume for free. Metrics it puts in ``self.pending_logs``
reach the next Trainer log (and so TensorBoard/W&B) and ``state.log_history``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from robustft import distributed
from robustft.checkpoint import load_state, save_state
from robustft.compat import caller_self

__all__ = ["RobustCallback", "caller_self"]


class RobustCallback(TrainerCallback):
    """Base class: logging through the Trainer and checkpoint/resume of the callback's state.

    Args:
        resume_state_from: checkpoint folder to read this callback's state from when the Trainer
            resumes; by default ``<output_dir>/checkpoint-<global_step>``.
        restart_if_missing: when resuming and no state is found, start afresh instead of raising.
    """

    #: file stem of the state in ``<checkpoint>/robustft/``; subclasses set it
    state_name: str = "state"

    def __init__(self, resume_state_from: str | None = None, restart_if_missing: bool = False):
        self.resume_state_from = resume_state_from
        self.restart_if_missing = restart_if_missing
        self.pending_logs: dict[str, float] = {}
        self.trainer: Trainer | None = None

    def attach(self, trainer: Trainer):
        """Use ``trainer`` (and register with it) instead of finding it when training starts; returns self."""
        if not isinstance(trainer, Trainer):
            raise ValueError(f"attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def wrap_method(
        self, name: str, make_wrapper: Callable[[Callable], Callable], target: Any = None
    ) -> Callable:
        """Put ``make_wrapper(original)`` on ``target`` (default: the Trainer) as ``name`` until
        :meth:`unwrap_method`.

        The Trainer gives callbacks no hook inside a step or around an evaluation, and DeepSpeed's engine
        steps inside the backward; wrapping the method on the instance (not the class) is the narrowest
        way in. Returns the original; wrapping twice keeps the first wrapper.
        """
        target = self.trainer if target is None else target
        current = getattr(target, name)
        if getattr(current, "robustft_owner", None) is self:
            return current.robustft_original
        wrapper = make_wrapper(current)
        wrapper.robustft_owner, wrapper.robustft_original = self, current
        wrapper.robustft_was_instance_attr = name in target.__dict__
        setattr(target, name, wrapper)
        return current

    def unwrap_method(self, name: str, target: Any = None) -> None:
        """Remove this callback's wrapper of ``name`` on ``target`` (only ours), restoring what was there."""
        target = self.trainer if target is None else target
        wrapper = target.__dict__.get(name) if target is not None else None
        if getattr(wrapper, "robustft_owner", None) is not self:
            return
        if wrapper.robustft_was_instance_attr:
            setattr(target, name, wrapper.robustft_original)
        else:
            delattr(target, name)

    @contextmanager
    def without_robustft_wrappers(self, name: str) -> Iterator[None]:
        """The Trainer's ``name`` with every robustft wrapper (any callback's) removed, put back on exit.

        EMA/SWA/LAWA wrap ``evaluate`` to swap their average in until their own ``on_train_end``; a WiSE-FT
        sweep running before that must score the live weights, whatever the order of the callbacks.
        """
        wrapper = self.trainer.__dict__.get(name) if self.trainer is not None else None
        plain = wrapper
        while getattr(plain, "robustft_owner", None) is not None:
            plain = plain.robustft_original
        if plain is wrapper:
            yield
            return
        setattr(self.trainer, name, plain)
        try:
            yield
        finally:
            setattr(self.trainer, name, wrapper)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta) that make a resumed run equal an uninterrupted one."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> None:
        """Inverse of ``state_dict``; ``source`` names the file for error messages."""

    def sharded_state(self) -> bool:
        """True when the state holds per-rank shards (FSDP2), so every rank writes its own file."""
        return False

    def save_to(self, checkpoint_dir: str) -> None:
        """Write this callback's state into ``checkpoint_dir`` (main process, or every rank if sharded)."""
        sharded = self.sharded_state()
        if not sharded and not distributed.is_main_process():
            return
        tensors, meta = self.state_dict()
        meta = {"callback": type(self).__name__, "world_size": distributed.world_size(), **meta}
        save_state(
            checkpoint_dir,
            self.state_name,
            tensors,
            meta,
            rank=distributed.rank() if sharded else None,
            write_meta=distributed.is_main_process(),
        )

    def load_from(self, checkpoint_dir: str) -> None:
        """Read this callback's state from ``checkpoint_dir``; missing state raises unless asked not to."""
        rank = distributed.rank() if self.sharded_state() else None
        try:
            tensors, meta = load_state(checkpoint_dir, self.state_name, rank=rank)
        except FileNotFoundError as err:
            if self.restart_if_missing:
                return
            raise FileNotFoundError(
                f"{type(self).__name__}: resuming from {checkpoint_dir} but its state is missing ({err}). "
                "Pass restart_if_missing=True to start this callback afresh."
            ) from err
        source = os.path.join(checkpoint_dir, "robustft", self.state_name)
        saved_world = meta.get("world_size", distributed.world_size())
        if rank is not None and saved_world != distributed.world_size():
            raise ValueError(
                f"{type(self).__name__}: {source} holds FSDP2 shards of {saved_world} ranks; resume with "
                f"{saved_world} ranks (now {distributed.world_size()})"
            )
        self.load_state_dict(tensors, meta, source=source)

    def resume_dir(self, args, state) -> str | None:
        """Checkpoint folder the Trainer resumed from (None when training starts at step 0)."""
        if state.global_step == 0:
            return None
        return self.resume_state_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    # -- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._log_before_reporters()
        if self.trainer is None:
            self.trainer = caller_self(Trainer)

    def on_save(self, args, state, control, **kwargs):
        self.save_to(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.pending_logs or logs is None:
            return
        logs.update(self.pending_logs)
        if state.log_history:
            state.log_history[-1].update(self.pending_logs)
        self.pending_logs = {}

    def _log_before_reporters(self) -> None:
        """Move this callback just after DefaultFlowCallback, so its metrics reach TensorBoard/W&B.

        The Trainer calls reporting callbacks before user callbacks and hands callbacks no handle
        on the list; the handler is the caller of this event, so it is found on the call stack.
        """
        handler = caller_self(CallbackHandler, depth=4)
        if handler is not None and self in handler.callbacks:
            callbacks = handler.callbacks
            callbacks.remove(self)
            flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
            callbacks.insert(flow[-1] + 1 if flow else 0, self)
