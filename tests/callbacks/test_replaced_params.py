"""A module replaced (or a tensor resized) during training is a named error before anything is written."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback

from robustft import (
    EMACallback,
    MGPOCallback,
    RandomPerturbationCallback,
    SAMCallback,
    SWACallback,
    WiseFTCallback,
)
from robustft.core.params import SelectionChangedError
from tests.tiny import tiny_bert, token_dataset, training_args


class Change(TrainerCallback):
    """At ``step``: a new classifier head (same shape), or the old head's tensors resized in place."""

    def __init__(self, step, how):
        self.step, self.how = step, how

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.step:
            return
        if self.how == "new_head":
            model.classifier = torch.nn.Linear(16, 2)
        else:
            model.classifier.weight.data = torch.zeros(3, 16)
            model.classifier.bias.data = torch.zeros(3)
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("how", ["new_head", "resized"])
@pytest.mark.parametrize(
    "make",
    [lambda tmp: WiseFTCallback(alpha=0.5),
     lambda tmp: EMACallback(decay=0.5, copy_to_model_at_end=True, save_dir=str(tmp / "ema")),
     lambda tmp: SWACallback(start=0, save_dir=str(tmp / "swa"))],
    ids=["wise_ft", "ema", "swa"],
)
def test_changed_selection_is_a_named_error_and_nothing_is_written(tmp_path, make, how):
    change = Change(4, how)  # the last step: after it only the end-of-training actions run
    args = training_args(tmp_path, max_steps=4)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(),
                      callbacks=[make(tmp_path), change])
    why = "replaced" if how == "new_head" else r"changed shape from \(2, 16\) to \(3, 16\)"
    with pytest.raises(SelectionChangedError, match=rf"'classifier.weight'.*{why}"):
        trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), change.after[n]), n
    assert not (tmp_path / "ema").exists() and not (tmp_path / "swa").exists()


def test_average_updates_stop_at_the_step_after_a_replacement(tmp_path):
    ema = EMACallback(decay=0.5, save_dir=None)
    args = training_args(tmp_path, max_steps=6)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(),
                      callbacks=[ema, Change(2, "new_head")])
    with pytest.raises(SelectionChangedError, match="EMACallback: parameter 'classifier.weight'"):
        trainer.train()
    assert trainer.state.global_step == 3 and ema.num_updates == 2


@pytest.mark.parametrize("make", [SAMCallback, RandomPerturbationCallback, MGPOCallback])
def test_perturbations_refuse_a_replaced_module_at_the_next_step(tmp_path, make):
    """SAM and the one-pass family would silently stop perturbing a replaced head: a named error instead,
    raised before the next perturbation, with the weights left as the step before ended them."""
    change = Change(2, "new_head")
    args = training_args(tmp_path, max_steps=4)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(), callbacks=[make(), change])
    with pytest.raises(SelectionChangedError, match=rf"{make.__name__}: parameter 'classifier.weight'"):
        trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), change.after[n]), n
