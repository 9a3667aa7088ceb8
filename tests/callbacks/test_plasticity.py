"""ShrinkPerturbCallback on a real Trainer: θ ← λθ + σε at the right steps with ε regenerated from the seed
(checked against a dense computation with an independent generator), task boundaries, resume, options."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback

from robustft import ShrinkPerturbCallback
from robustft.ops.perturb import noise_seed
from tests.tiny import tiny_bert, token_dataset, training_args


class Snap(TrainerCallback):
    """The weights at every step end: after the shrink, which acts right after ``optimizer.step()``."""

    def __init__(self):
        self.weights = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[-1] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


class SnapUpdate(Snap):
    """The weights right after ``optimizer.step()``, before the shrink when listed before the callback."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        pass


def _train(out, callbacks, resume=None, model=None, **args):
    trainer = Trainer(model=model or tiny_bert(), args=training_args(out, **args),
                      train_dataset=token_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _dense(weights, shrink, sigma, seed, step):
    """λθ + σε with ε drawn by a fresh torch.Generator from noise_seed(seed, step, i)."""
    out = {}
    for i, (n, w) in enumerate(weights.items()):
        g = torch.Generator().manual_seed(noise_seed(seed, step, i))
        out[n] = shrink * w + sigma * torch.randn(w.shape, generator=g)
    return out


def test_every_n_steps_equals_the_dense_update_and_skips_the_last_step(tmp_path):
    before, after = SnapUpdate(), Snap()
    _train(tmp_path, [before, ShrinkPerturbCallback(shrink=0.6, sigma=0.01, every_n_steps=4, seed=5), after])
    for step in range(1, 9):
        if step == 4:
            want = _dense(before.weights[4], 0.6, 0.01, 5, 4)
            for n, w in after.weights[4].items():
                assert torch.equal(w, want[n]), n
        else:  # no other step, and never after the last one (step 8)
            for n, w in after.weights[step].items():
                assert torch.equal(w, before.weights[step][n]), (step, n)


def test_at_train_begin_is_the_task_boundary(tmp_path):
    warm = tiny_bert(seed=3)  # a model trained on an earlier task
    start = {n: p.detach().clone() for n, p in warm.named_parameters()}
    after = Snap()
    _train(tmp_path, [ShrinkPerturbCallback(shrink=0.5, sigma=0.02, at_train_begin=True, seed=1), after],
           model=warm, max_steps=1)
    want = _dense(start, 0.5, 0.02, 1, 0)
    for n, w in after.weights[-1].items():
        assert torch.equal(w, want[n]), n


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    def run(seed, out):
        model = _train(out, [ShrinkPerturbCallback(shrink=0.7, sigma=0.05, every_n_steps=3, seed=seed)]).model
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    a, b, c = run(0, tmp_path / "a"), run(0, tmp_path / "b"), run(1, tmp_path / "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_identity_options_leave_the_weights_alone(tmp_path):
    plain = _train(tmp_path / "plain", []).model
    same = _train(tmp_path / "same", [ShrinkPerturbCallback(shrink=1.0, sigma=0.0, every_n_steps=1)]).model
    for (n, p), q in zip(plain.named_parameters(), same.parameters()):
        assert torch.equal(p, q), n


def test_resumed_equals_uninterrupted(tmp_path):
    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    make = lambda: ShrinkPerturbCallback(shrink=0.8, sigma=0.01, every_n_steps=3, at_train_begin=True)  # noqa: E731
    want = _train(tmp_path / "full", [make()]).model
    _train(tmp_path / "part", [make(), Stop()], save_strategy="steps", save_steps=4)
    got = _train(tmp_path / "part", [make()], resume=True).model  # not shrunk again at train begin
    for (n, p), q in zip(want.named_parameters(), got.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(shrink=0.0, sigma=0.1, every_n_steps=1), "shrink"),
        (dict(shrink=1.5, sigma=0.1, every_n_steps=1), "shrink"),
        (dict(shrink=float("nan"), sigma=0.1, every_n_steps=1), "shrink"),
        (dict(shrink=0.5, sigma=-0.1, every_n_steps=1), "sigma"),
        (dict(shrink=0.5, sigma=0.1, every_n_steps=0), "every_n_steps"),
        (dict(shrink=0.5, sigma=0.1, every_n_steps=1.5), "every_n_steps"),
        (dict(shrink=0.5, sigma=0.1), "every_n_steps"),
        (dict(shrink=0.5, sigma=0.1, at_train_begin="yes"), "at_train_begin"),
        (dict(shrink=0.5, sigma=0.1, every_n_steps=1, seed=1.5), "seed"),
    ],
)
def test_bad_option_is_refused_at_construction(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ShrinkPerturbCallback(**kwargs)
