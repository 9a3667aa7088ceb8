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


class Failure(RuntimeError):
    """The injected error."""


class RaiseAt(TrainerCallback):
    """Raises ``Failure`` from ``event`` at optimizer step ``step`` (counted from 1)."""

    def __init__(self, event: str, step: int):
        self.event, self.step = event, step

    def _maybe(self, state, event):
        if event == self.event and state.global_step + (event != "on_step_end") == self.step:
            raise Failure(f"injected at {event}, step {self.step}")

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe(state, "on_step_end")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._maybe(state, "on_pre_optimizer_step")


class LossRaisesAt(Trainer):
    """A Trainer whose ``compute_loss`` raises in optimizer step ``fail_step`` (inside the micro-batch)."""

    fail_step = 0

    def compute_loss(self, *args, **kwargs):
        if self.state.global_step + 1 == self.fail_step:
            raise Failure(f"injected in compute_loss, step {self.fail_step}")
        return super().compute_loss(*args, **kwargs)


def fail_training(model, out, callbacks, where: str, step: int, **args) -> Trainer:
    """Train ``model`` with ``callbacks`` until the injected failure at ``step``; returns the Trainer."""
    kind = LossRaisesAt if where == "compute_loss" else Trainer
    extra = [] if where == "compute_loss" else [RaiseAt(where, step)]
    trainer = kind(model=model, args=training_args(out, **args), train_dataset=token_dataset(),
                   callbacks=[*callbacks, *extra])
    trainer.fail_step = step
    with pytest.raises(Failure):
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
