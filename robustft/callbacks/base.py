"""What every robustft callback shares: metrics into the Trainer's logs, state beside checkpoints, and
one fixed order for what the callbacks do to the model when training ends.

A subclass implements ``state_dict()``/``load_state_dict()`` (tensors + small JSON meta) and
gets save-on-checkpoint and load-on-resume for free. Metrics it puts in ``self.pending_logs``
reach the next Trainer log (and so TensorBoard/W&B) and ``state.log_history``. A subclass that acts
on the model at the end of training implements ``end_of_training`` and names its phase
(``end_phase``): the first robustft callback to get ``on_train_end`` runs every attached robustft
callback's end action in phase order, so the result never depends on the order of the callback list
(docs/composition.md).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from robustft.checks import check_bool
from robustft.core import distributed
from robustft.core.checkpoint import load_state, save_state
from robustft.core.compat import UNKNOWN_RESUME, caller_self, trainer_resume_checkpoint, training_loop_running
from robustft.core.params import keep_4bit_trainable

__all__ = [
    "END_COMPOSE",
    "END_COPY_AVERAGE",
    "END_INTERPOLATE",
    "END_SAVE_AVERAGE",
    "RobustCallback",
    "caller_self",
]

#: end-of-training phases, run in this order whatever the order of the callback list (docs/composition.md)
END_SAVE_AVERAGE = 0  # an average saved as a model, swapped in and back out: the live weights are untouched
END_COPY_AVERAGE = 1  # an average copied into the model (copy_to_model_at_end): the end point from now on
END_INTERPOLATE = 2  # WiSE-FT: θ(α) between the start and the end point (live, or the average copied in)
END_COMPOSE = 3  # LoRA arithmetic: compose the adapter as the model finally holds it


class RobustCallback(TrainerCallback):
    """Base class: logging through the Trainer and checkpoint/resume of the callback's state.

    Args:
        resume_state_from: checkpoint folder to read this callback's state from when the Trainer
            resumes; by default the folder the Trainer resumes from (``resume_from_checkpoint``).
        restart_if_missing: when resuming and no state is found, start afresh instead of raising.
    """

    #: file stem of the state in ``<checkpoint>/robustft/``; subclasses set it
    state_name: str = "state"

    def __init__(self, resume_state_from: str | None = None, restart_if_missing: bool = False):
        if resume_state_from is not None and not isinstance(resume_state_from, (str, os.PathLike)):
            raise ValueError(f"resume_state_from must be a folder path, got {resume_state_from!r}")
        check_bool("restart_if_missing", restart_if_missing)
        self.resume_state_from = resume_state_from
        self.restart_if_missing = restart_if_missing
        self.pending_logs: dict[str, float] = {}
        self.trainer: Trainer | None = None
        self._resumed_from: str | None | object = UNKNOWN_RESUME
        self._ended = True
        self._run: Any = None  # the TrainerState of the run in progress (set at on_train_begin)

    def attach(self, trainer: Trainer):
        """Use ``trainer`` (and register with it) instead of finding it when training starts; returns self."""
        if not isinstance(trainer, Trainer):
            raise ValueError(f"attach: expected a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def wrap_method(
        self, name: str, make_wrapper: Callable[[Callable], Callable], target: Any = None,
        run_scoped: bool = True,
    ) -> Callable:
        """Put ``make_wrapper(original)`` on ``target`` (default: the Trainer) as ``name`` until
        :meth:`unwrap_method`, or until the training run that put it there is over.

        The Trainer gives callbacks no hook inside a step or around an evaluation, and DeepSpeed's engine
        steps inside the backward; wrapping the method on the instance (not the class) is the narrowest
        way in. ``original`` calls whatever is below this wrapper at call time, so another callback's
        wrapper can be removed from under it. Returns ``original``; wrapping twice in one run keeps the
        first wrapper (also under other callbacks' wrappers).

        ``run_scoped`` (the default): the wrapper acts only inside the ``train()`` run during which it was
        put there. The Trainer calls no callback when ``train()`` raises, so a wrapper left behind by such
        a run finds out on its next call (:meth:`in_run`) that its run is over, removes itself and calls
        straight through; the next ``on_train_begin`` of the callback replaces it. This is the one
        mechanism that keeps what a callback attaches from outliving its run, exceptions included; nothing
        is ever attached to the model itself beyond one call.
        """
        target = self.trainer if target is None else target
        current = getattr(target, name)
        link = current
        while getattr(link, "robustft_owner", None) is not None:
            if link.robustft_owner is self:
                if not link.robustft_run_scoped or link.robustft_run is self._run:
                    return link.robustft_call_original
                self.unwrap_method(name, target=target)  # a previous run's leftover: replaced
                return self.wrap_method(name, make_wrapper, target=target, run_scoped=run_scoped)
            link = link.robustft_original

        def original(*args, **kwargs):
            return wrapper.robustft_original(*args, **kwargs)

        acting = make_wrapper(original)
        run = self._run

        def wrapper(*args, **kwargs):
            if run_scoped and not self.in_run(run):
                self.unwrap_method(name, target=target)  # its run ended (by an exception): gone from now on
                return original(*args, **kwargs)
            return acting(*args, **kwargs)

        functools.update_wrapper(wrapper, acting)  # carry the marks the wrapped method's wrapper carries
        wrapper.robustft_owner, wrapper.robustft_original = self, current
        wrapper.robustft_call_original = original
        wrapper.robustft_was_instance_attr = name in target.__dict__
        wrapper.robustft_run, wrapper.robustft_run_scoped = run, run_scoped
        setattr(target, name, wrapper)
        return original

    def in_run(self, run: Any) -> bool:
        """True while the training run ``run`` (its ``TrainerState``) is running: the Trainer still holds
        that state and its training loop is on the call stack. Without a known Trainer (events called by
        hand) there is no way to tell, and the answer is True."""
        if self.trainer is None or run is None:
            return True
        return self.trainer.state is run and training_loop_running(self.trainer)

    def unwrap_method(self, name: str, target: Any = None) -> None:
        """Remove this callback's wrapper of ``name`` on ``target`` (only ours, wherever it sits in the
        chain of robustft wrappers), restoring what was below it."""
        target = self.trainer if target is None else target
        outer, link = None, target.__dict__.get(name) if target is not None else None
        while getattr(link, "robustft_owner", None) is not None and link.robustft_owner is not self:
            outer, link = link, link.robustft_original
        if getattr(link, "robustft_owner", None) is not self:
            return
        if outer is not None:  # another callback wrapped over ours: it now calls what ours called
            outer.robustft_original = link.robustft_original
            outer.robustft_was_instance_attr = link.robustft_was_instance_attr
        elif link.robustft_was_instance_attr:
            setattr(target, name, link.robustft_original)
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
        """Folder to read this callback's state from: None when the Trainer starts afresh, else
        ``resume_state_from`` or the folder the Trainer resumes from (``resume_from_checkpoint``)."""
        resumed = self._resumed_from
        if resumed is UNKNOWN_RESUME:  # no training loop on the stack (on_train_begin called by hand)
            resumed = None if state.global_step == 0 else os.path.join(
                args.output_dir, f"checkpoint-{state.global_step}"
            )
        if resumed is None:
            return None
        return os.fspath(self.resume_state_from) if self.resume_state_from is not None else resumed

    # -- end of training ----------------------------------------------------------------------
    #: phase of :meth:`end_of_training` (``END_*``); None: the callback does nothing to the model at the end
    end_phase: int | None = None

    def end_of_training(self, args, state, control, **kwargs) -> None:
        """What the callback does when training ends; run once, in phase order (see :meth:`on_train_end`)."""

    def _attached(self) -> list[RobustCallback]:
        """The robustft callbacks of this callback's Trainer (just this one when no Trainer is known)."""
        if self.trainer is None:
            return [self]
        attached = [cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, RobustCallback)]
        return attached if self in attached else [self, *attached]

    def _check_end_phases(self) -> None:
        """Refuse, before any step, two callbacks that would each replace the model by their average."""
        copiers = [cb for cb in self._attached() if cb.end_phase == END_COPY_AVERAGE]
        if len(copiers) > 1:
            raise ValueError(
                "copy_to_model_at_end: more than one callback copies its average into the model at the end "
                f"({', '.join(type(cb).__name__ for cb in copiers)}); keep it on one of them "
                "(docs/composition.md)"
            )

    # -- Trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        # the Trainer running this event (a callback reused with another Trainer follows it), else attached
        self.trainer = caller_self(Trainer) or self.trainer
        self._resumed_from = trainer_resume_checkpoint(Trainer)
        self._ended = False
        self._run = state
        model = kwargs.get("model")
        model = getattr(self.trainer, "model", None) if model is None else model
        if model is not None:  # a QLoRA base evaluated during training must still train
            keep_4bit_trainable(model)
        if self.trainer is not None:
            self._log_through_trainer()
        self._check_end_phases()

    def on_train_end(self, args, state, control, **kwargs):
        """Run the end actions of every attached robustft callback, in phase order, once.

        The first robustft callback to get the event runs them all (the callbacks of one phase touch
        disjoint things, so their order within it does not matter); the others find theirs done.
        """
        pending = [cb for cb in self._attached() if not cb._ended and cb.end_phase is not None]
        for cb in sorted(pending, key=lambda cb: cb.end_phase):
            cb._ended = True
            cb.end_of_training(args, state, control, **kwargs)
        self._ended = True

    def on_save(self, args, state, control, **kwargs):
        self.save_to(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.pending_logs or logs is None:
            return
        logs.update(self.pending_logs)
        if state.log_history:
            state.log_history[-1].update(self.pending_logs)
        self.pending_logs = {}

    def _log_through_trainer(self) -> None:
        """Put the pending metrics into every ``Trainer.log`` before any callback sees the logs.

        The Trainer calls reporting callbacks (TensorBoard/W&B) before user callbacks, so ``on_log`` comes
        too late for them; wrapping ``log`` reaches them without reordering the user's callback list
        (``on_log`` stays the fallback when no Trainer is known).
        """

        def make_wrapper(original):
            def log(logs, *args, **kwargs):
                if self.pending_logs and logs is not None:
                    logs.update(self.pending_logs)
                    self.pending_logs = {}
                return original(logs, *args, **kwargs)

            return log

        # not run-scoped: metrics set when training ends reach the next log, also after train() returned
        self.wrap_method("log", make_wrapper, run_scoped=False)
