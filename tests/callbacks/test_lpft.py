"""LPFTCallback on a real Trainer: the backbone bit-identical through the probe phase (AdamW + weight decay),
moving after it; the head trained in both; WiSE-FT from the probed model in either list order; resume."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback

from robustft import LPFTCallback, WiseFTCallback
from tests.callbacks.failing import (
    FAILURES,
    assert_nothing_attached,
    assert_trains_like_a_fresh_copy,
    fail_training,
)
from tests.tiny import stop_at, tiny_bert, token_dataset, training_args

ADAMW = dict(weight_decay=0.1, adam_beta1=0.9, max_grad_norm=1.0)
HEAD = ("classifier.weight", "classifier.bias")


class Recorder(TrainerCallback):
    """The weights after every optimizer step (and at train begin), and which have optimizer state."""

    def __init__(self):
        self.weights, self.has_state = {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        inner = getattr(optimizer, "optimizer", optimizer)
        self.has_state[state.global_step] = {n: bool(inner.state.get(p)) for n, p in model.named_parameters()}


def _train(out, callbacks, resume=None, **args):
    trainer = Trainer(model=tiny_bert(), args=training_args(out, **{**ADAMW, **args}),
                      train_dataset=token_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_backbone_bit_identical_through_the_probe_then_trained(tmp_path):
    rec = Recorder()
    _train(tmp_path, [LPFTCallback(probe_steps=3), rec])
    w = rec.weights
    backbone = [n for n in w[0] if n not in HEAD]
    for step in (1, 2, 3):
        for n in backbone:  # AdamW's decoupled decay would move them: they are frozen inside the optimizer
            assert _bits_equal(w[step][n], w[0][n]), (step, n)
            assert not rec.has_state[step][n]  # the optimizer skipped them: no moments, no step count
        for n in HEAD:
            assert not torch.equal(w[step][n], w[step - 1][n]), (step, n)
    moved = [n for n in backbone if not torch.equal(w[4][n], w[3][n])]
    assert len(moved) > 0.9 * len(backbone)  # from step 4 the backbone trains
    for n in HEAD:
        assert not torch.equal(w[8][n], w[3][n])


def test_probe_phase_trains_the_head_as_a_true_linear_probe(tmp_path):
    """Reference: the backbone frozen with requires_grad=False before the Trainer is built (its optimizer then
    holds the head only). The same model after the probe steps: clipping and AdamW saw the head alone."""
    rec = Recorder()
    clip = {**ADAMW, "max_grad_norm": 0.05}  # clipping acts at every step
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path / "lpft", **clip),
                      train_dataset=token_dataset(), callbacks=[LPFTCallback(probe_steps=3), rec])
    trainer.train()
    model = tiny_bert()
    for n, p in model.named_parameters():
        p.requires_grad_(n in HEAD)
    trainer = Trainer(model=model, args=training_args(tmp_path / "lp", **clip, max_steps=3),
                      train_dataset=token_dataset())
    trainer.train()
    for n, p in model.named_parameters():
        torch.testing.assert_close(rec.weights[3][n], p.detach(), atol=1e-7, rtol=0, msg=n)


def test_without_the_callback_weight_decay_moves_the_backbone(tmp_path):
    """The reference the test above is meant to fail against: AdamW with weight decay moves every weight."""
    rec = Recorder()
    _train(tmp_path, [rec], max_steps=1)
    assert not torch.equal(rec.weights[1]["bert.encoder.layer.0.attention.self.query.weight"],
                           rec.weights[0]["bert.encoder.layer.0.attention.self.query.weight"])


def test_probe_epochs_sets_the_boundary_at_the_end_of_the_epoch(tmp_path):
    rec = Recorder()  # 64 examples, batch 8: 8 steps per epoch
    _train(tmp_path, [LPFTCallback(probe_epochs=1), rec], max_steps=-1, num_train_epochs=2, logging_steps=4)
    name = "bert.encoder.layer.1.output.dense.weight"
    assert _bits_equal(rec.weights[8][name], rec.weights[0][name])
    assert not torch.equal(rec.weights[9][name], rec.weights[8][name])


@pytest.mark.parametrize("order", ["lpft_first", "wise_first"])
def test_wise_ft_interpolates_from_the_probed_model_in_either_order(tmp_path, order):
    rec = Recorder()
    _train(tmp_path / "ref", [LPFTCallback(probe_steps=3), rec])
    probed, end = rec.weights[3], rec.weights[8]
    lpft, wise = LPFTCallback(probe_steps=3), WiseFTCallback(alpha=0.25)
    trainer = _train(tmp_path / "run", [lpft, wise] if order == "lpft_first" else [wise, lpft])
    got = {n: p.detach() for n, p in trainer.model.named_parameters()}
    for n in got:
        torch.testing.assert_close(got[n], 0.75 * probed[n] + 0.25 * end[n], atol=1e-6, rtol=0, msg=n)
    # the probed start differs from the pretrained start (on the head)
    assert not torch.equal(probed["classifier.weight"], rec.weights[0]["classifier.weight"])


def test_interpolate_from_probe_false_keeps_the_pretrained_start(tmp_path):
    rec = Recorder()
    _train(tmp_path / "ref", [LPFTCallback(probe_steps=3), rec])
    trainer = _train(tmp_path / "run", [LPFTCallback(probe_steps=3, interpolate_from_probe=False),
                                        WiseFTCallback(alpha=0.25)])
    for n, p in trainer.model.named_parameters():
        want = 0.75 * rec.weights[0][n] + 0.25 * rec.weights[8][n]
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("cut", [2, 4], ids=["in_probe", "after_probe"])
def test_resumed_equals_uninterrupted(tmp_path, cut):
    make = lambda: [LPFTCallback(probe_steps=3), WiseFTCallback(alpha=0.5)]  # noqa: E731
    want = {n: p.detach().clone() for n, p in _train(tmp_path / "full", make()).model.named_parameters()}
    _train(tmp_path / "part", [*make(), stop_at(cut)], save_strategy="steps", save_steps=cut)
    got = _train(tmp_path / "part", make(), resume=True).model
    for n, p in got.named_parameters():
        assert torch.equal(p.detach(), want[n]), n


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(), "probe_steps"),
        (dict(probe_steps=2, probe_epochs=1), "probe_steps"),
        (dict(probe_steps=0), "probe_steps"),
        (dict(probe_steps=2.5), "probe_steps"),
        (dict(probe_epochs=True), "probe_epochs"),
        (dict(probe_steps=2, head=""), "head"),
        (dict(probe_steps=2, head="("), "head"),
        (dict(probe_steps=2, interpolate_from_probe="yes"), "interpolate_from_probe"),
    ],
)
def test_bad_option_is_refused_at_construction(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LPFTCallback(**kwargs)


def test_head_matching_nothing_or_everything_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="head"):
        _train(tmp_path / "a", [LPFTCallback(probe_steps=1, head="no_such_module")], max_steps=1)
    with pytest.raises(ValueError, match="head"):
        _train(tmp_path / "b", [LPFTCallback(probe_steps=1, head=".")], max_steps=1)


@pytest.mark.parametrize("where", FAILURES)
def test_a_run_failing_in_the_probe_leaves_the_model_training_like_a_fresh_copy(tmp_path, where):
    """train() raises at step 2 of a 5-step probe: no hook is left, and a plain run on the model equals the
    same run on a fresh copy (a frozen backbone left behind would not move)."""
    model = tiny_bert()
    fail_training(model, tmp_path / "failed", [LPFTCallback(probe_steps=5)], where, step=2, **ADAMW)
    assert_nothing_attached(model)
    assert_trains_like_a_fresh_copy(model, tiny_bert, tmp_path, **ADAMW, max_steps=3)


# -- the two-stage form (Kumar et al.'s two trainings) ------------------------------------------------
TWO_STAGE = dict(weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=1)


class RecordingTrainer(Trainer):
    """Keeps every batch ``compute_loss`` sees, so a hand-written loop can replay them."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().compute_loss(model, inputs, *args, **kwargs)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _linear_warmup(warmup, total):
    return lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))


def _reference_two_stage(batches, probe, lr=5e-3):
    """The paper's procedure by hand: AdamW + its own warmup/linear schedule on the head alone for ``probe``
    steps, then a fresh AdamW + a fresh schedule on every parameter for the rest."""
    model = _no_dropout(tiny_bert())
    model.train()
    stages = [([p for n, p in model.named_parameters() if n in HEAD], batches[:probe]),
              (list(model.parameters()), batches[probe:])]
    for params, stage in stages:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup(1, len(stage)))
        for batch in stage:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            model.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("two_stage", [True, False], ids=["two_stage", "one_schedule"])
def test_two_stage_form_equals_a_hand_written_two_stage_loop(tmp_path, two_stage):
    """two_stage=True: equal to the reference; the default one-schedule form is not (the test can fail)."""
    trainer = RecordingTrainer(model=_no_dropout(tiny_bert()), args=training_args(tmp_path, **TWO_STAGE),
                               train_dataset=token_dataset(),
                               callbacks=[LPFTCallback(probe_steps=3, two_stage=two_stage)])
    trainer.train()
    want = _reference_two_stage(trainer.batches, probe=3)
    gap = max(float((p.detach() - want[n]).abs().max()) for n, p in trainer.model.named_parameters())
    if two_stage:
        assert gap < 1e-6
    else:
        assert gap > 1e-4


@pytest.mark.parametrize("cut", [2, 3, 5], ids=["in_probe", "at_boundary", "after_probe"])
def test_two_stage_resumed_equals_uninterrupted(tmp_path, cut):
    make = lambda: [LPFTCallback(probe_steps=3, two_stage=True), WiseFTCallback(alpha=0.5)]  # noqa: E731
    full = _train(tmp_path / "full", make(), **TWO_STAGE)
    want = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    _train(tmp_path / "part", [*make(), stop_at(cut)], save_strategy="steps", save_steps=cut, **TWO_STAGE)
    got = _train(tmp_path / "part", make(), resume=True, **TWO_STAGE).model
    for n, p in got.named_parameters():
        assert torch.equal(p.detach(), want[n]), n


def test_two_stage_refuses_a_scheduler_the_trainer_did_not_build(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(),
                      optimizers=(optimizer, schedule),
                      callbacks=[LPFTCallback(probe_steps=2, two_stage=True)])
    with pytest.raises(ValueError, match="two_stage"):
        trainer.train()
