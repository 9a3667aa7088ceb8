"""The shared checks of every exported callback, driven by the settings table (tests/callbacks/settings.py):
an exception in a step leaves weights and hooks as before, a resumed run equals the uninterrupted one bit
for bit, and the order among WiseFTCallback and EMACallback does not change the result."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from robustft import EMACallback, WiseFTCallback
from tests.callbacks.failing import assert_nothing_attached, assert_trains_like_a_fresh_copy, fail_training
from tests.callbacks.settings import (
    FAILURE,
    MODELS,
    NOT_RUN,
    ORDER,
    RESUME,
    SETTINGS,
    assert_bit_equal,
    exported_callbacks,
    params,
    saved_files,
    train,
    weights,
)
from tests.tiny import stop_at

STEPS = 4


def test_every_exported_callback_has_a_row():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)), "a callback has two rows"
    assert set(names) | set(NOT_RUN) == exported_callbacks()


class Snapshots(TrainerCallback):
    """The model's weights at the end of each optimizer step (placed after the tested callback)."""

    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = weights(model)


#: the loss inside the step in the fast subset; the event just before the optimizer step marked slow (a
#: second failure point for every row would double the matrix's time)
WHERE = ["compute_loss", pytest.param("on_pre_optimizer_step", marks=pytest.mark.slow)]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("setting", params(FAILURE))
def test_an_exception_in_a_step_leaves_weights_and_hooks_as_before(tmp_path, setting, where):
    make_model = MODELS[setting.model]
    model = make_model()
    snapshots = Snapshots()
    fail_training(model, tmp_path / "failed", [setting.make(model), snapshots], where, step=2, max_steps=3)
    assert_nothing_attached(model)
    assert_bit_equal(weights(model), snapshots.at[1])  # the failed step moved nothing
    assert_trains_like_a_fresh_copy(model, make_model, tmp_path, max_steps=2)


@pytest.mark.slow  # three Trainer runs per row (about a minute for the table here): CI runs it
@pytest.mark.parametrize("setting", params(RESUME))
def test_resumed_equals_uninterrupted_bit_for_bit(tmp_path, setting):
    make_model = MODELS[setting.model]
    args = dict(max_steps=STEPS, save_strategy="steps", save_steps=2)
    model = make_model()
    full = train(model, tmp_path / "full", [setting.make(model)], **args)
    model = make_model()
    train(model, tmp_path / "part", [setting.make(model), stop_at(2)], **args)
    model = make_model()  # in another output_dir: the cut run's end-of-training files are not in the way
    resumed = train(model, tmp_path / "resumed", [setting.make(model)],
                    resume=str(tmp_path / "part" / "checkpoint-2"), **args)
    assert_bit_equal(weights(resumed.model), weights(full.model))
    assert saved_files(tmp_path / "resumed") == saved_files(tmp_path / "full")


_PAIR = "is one of the pair (WiseFTCallback, EMACallback) itself"
#: the orders compared: the row's callback X first, and the reverse (X last)
ORDERS = {"x-wise-ema": ("x", "wise", "ema"), "ema-wise-x": ("ema", "wise", "x")}


@pytest.mark.slow  # two Trainer runs per row: CI runs it
@pytest.mark.parametrize("setting", [
    p if p.values[0].name not in ("WiseFTCallback", "EMACallback")
    else pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason=_PAIR)])
    for p in params(ORDER)])
def test_order_with_wise_ft_and_ema_does_not_matter(tmp_path, setting):
    make_model = MODELS[setting.model]
    results = {}
    for name, order in ORDERS.items():
        model = make_model()
        made = {"x": setting.make(model), "wise": WiseFTCallback(alpha=0.5), "ema": EMACallback(decay=0.7)}
        trainer = train(model, tmp_path / name, [made[k] for k in order], max_steps=STEPS)
        results[name] = weights(trainer.model), saved_files(tmp_path / name)
    want_weights, want_files = results.pop("x-wise-ema")
    for name, (got_weights, got_files) in results.items():
        assert_bit_equal(got_weights, want_weights)
        assert got_files == want_files, name
