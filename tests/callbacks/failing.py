"""A training run that raises at optimizer step k (from a callback event or from compute_loss), and the
checks that nothing a callback attached outlives it: the model trains exactly like a fresh copy."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback

from tests.tiny import token_dataset, training_args

#: where the run raises: a callback's event after the step, one just before the step, or the loss itself
FAILURES = ("on_step_end", "on_pre_optimizer_step", "compute_loss")
#: failure points inside an optimizer step, between its on_step_begin and its optimizer.step(): another
#: callback's on_step_begin (after the tested one), the loss, the Trainer's bookkeeping between two
#: micro-batches (``floating_point_ops``, needs gradient accumulation), its gradient clipping, the event
#: just before the step
INSIDE_STEP = ("on_step_begin", "compute_loss", "between_micro_batches", "clip", "on_pre_optimizer_step")


class Failure(RuntimeError):
    """The injected error."""


class RaiseAt(TrainerCallback):
    """Raises ``error`` (default ``Failure``) from ``event`` at optimizer step ``step`` (counted from 1)."""

    def __init__(self, event: str, step: int, error: type[BaseException] = Failure):
        self.event, self.step, self.error = event, step, error

    def _maybe(self, state, event):
        if event == self.event and state.global_step + (event != "on_step_end") == self.step:
            raise self.error(f"injected at {event}, step {self.step}")

    def on_step_begin(self, args, state, control, **kwargs):
        self._maybe(state, "on_step_begin")

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe(state, "on_step_end")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._maybe(state, "on_pre_optimizer_step")


class LossRaisesAt(Trainer):
    """A Trainer that raises ``fail_error`` in optimizer step ``fail_step``: in ``compute_loss`` (its
    ``fail_call``-th call of that step: 2 is exact SAM's replay), between micro-batches
    (``floating_point_ops``) or in its gradient clipping (``fail_in``)."""

    fail_step = 0
    fail_in = "compute_loss"
    fail_call = 1
    fail_error: type[BaseException] = Failure

    def _maybe(self, where: str) -> None:
        if where != self.fail_in or self.state.global_step + 1 != self.fail_step:
            return
        calls = self.__dict__.setdefault("_calls", {})
        calls[self.fail_step] = calls.get(self.fail_step, 0) + 1
        if calls[self.fail_step] == self.fail_call:
            raise self.fail_error(f"injected in {where}, step {self.fail_step}")

    def compute_loss(self, *args, **kwargs):
        self._maybe("compute_loss")
        return super().compute_loss(*args, **kwargs)

    def floating_point_ops(self, inputs):
        self._maybe("between_micro_batches")
        return super().floating_point_ops(inputs)


def fail_training(model, out, callbacks, where: str, step: int, error: type[BaseException] = Failure,
                  call: int = 1, **args) -> Trainer:
    """Train ``model`` with ``callbacks`` until ``error`` is raised at ``where`` (``FAILURES`` or
    ``INSIDE_STEP``) in optimizer step ``step``; returns the Trainer."""
    in_trainer = where in ("compute_loss", "between_micro_batches", "clip")
    kind = LossRaisesAt if in_trainer else Trainer
    extra = [] if in_trainer else [RaiseAt(where, step, error)]
    if where == "clip":
        args.setdefault("max_grad_norm", 1.0)
    trainer = kind(model=model, args=training_args(out, **args), train_dataset=token_dataset(),
                   callbacks=[*callbacks, *extra])
    trainer.fail_step, trainer.fail_in, trainer.fail_error, trainer.fail_call = step, where, error, call
    if where == "clip":  # the Trainer's own clipping method (named by compat), raising at the failure step
        from robustft.core import compat

        name = compat.clip_grad_norm_name(trainer)
        clip = getattr(trainer, name)

        def failing_clip(model):
            trainer._maybe("clip")
            return clip(model)

        setattr(trainer, name, failing_clip)
    with pytest.raises(error):
        trainer.train()
    return trainer


def assert_nothing_attached(model: torch.nn.Module) -> None:
    """No tensor hook on any parameter, no hook on any module."""
    for name, p in model.named_parameters():
        assert not p._backward_hooks, f"{name} keeps {len(p._backward_hooks)} gradient hook(s)"
    for name, m in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, kind), f"module {name!r} keeps {kind}"


def assert_trains_like_a_fresh_copy(model: torch.nn.Module, make, out, **args) -> None:
    """A plain Trainer run on ``model`` gives bit for bit the weights of the same run on a fresh copy."""
    fresh = make()
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    results = []
    for i, m in enumerate((model, fresh)):
        Trainer(model=m, args=training_args(out / f"plain{i}", **args), train_dataset=token_dataset()).train()
        results.append({n: p.detach().clone() for n, p in m.named_parameters()})
    moved = sum(int((results[0][n] != fresh_p).sum()) for n, fresh_p in results[1].items())
    assert moved == 0, f"{moved} entries differ from the fresh copy's run"


def disarm(trainer: Trainer) -> None:
    """Remove the injected failure, so the same Trainer can train again."""
    trainer.fail_step = 0
    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, RaiseAt):
            trainer.remove_callback(cb)
