"""The one-pass perturbation callbacks (robustft/callbacks/perturbation.py) and exact SAM leave exactly the
unperturbed weights when ``train()`` raises anywhere inside a step (DESIGN: temporary weight changes are
always undone, also when a step raises)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from robustft import GGPOCallback, MomentumSAMCallback, RandomPerturbationCallback, SAMCallback
from tests.callbacks.failing import INSIDE_STEP, Failure, assert_nothing_attached, fail_training
from tests.tiny import tiny_bert

STEP = 2  # the failing optimizer step: MomentumSAM has momentum from step 1 on

ONE_PASS = {
    "msam": lambda: MomentumSAMCallback(rho=0.3),
    "rwp": lambda: RandomPerturbationCallback(rho=0.05, seed=3),
    "ggpo": lambda: GGPOCallback(rho=0.05),
}


class WeightsAfter(TrainerCallback):
    """The weights at the end of optimizer step ``step`` (after zero_grad: what the next step starts from),
    and whether the forwards of the following step ran at other weights (the perturbation was applied)."""

    def __init__(self, step: int):
        self.step, self.weights, self.perturbed_forward = step, None, False

    def on_train_begin(self, args, state, control, model=None, **kw):
        def forward(module, inputs):
            if self.weights is not None and state.global_step == self.step:
                self.perturbed_forward |= any(
                    not torch.equal(p, self.weights[n]) for n, p in model.named_parameters()
                )

        self.hook = model.register_forward_pre_hook(forward)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_unperturbed(model, probe: WeightsAfter) -> None:
    probe.hook.remove()
    assert_nothing_attached(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), probe.weights[n].view(torch.int32)), n


@pytest.mark.parametrize("where", INSIDE_STEP)
@pytest.mark.parametrize("variant", list(ONE_PASS))
def test_one_pass_failure_inside_a_step_leaves_the_unperturbed_weights(tmp_path, variant, where):
    """train() raising at any point of step k (another callback's on_step_begin after this one, the loss,
    between micro-batches, the clipping, before the optimizer step) leaves bit for bit the weights step k-1
    ended with: no optimizer step happened, so nothing else may have changed them."""
    model, probe = tiny_bert(), WeightsAfter(STEP - 1)
    fail_training(model, tmp_path, [ONE_PASS[variant](), probe], where, STEP,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2)
    if where in ("compute_loss", "on_step_begin"):
        assert not probe.perturbed_forward  # the failure came before (or as) the first forward of step k
    else:
        assert probe.perturbed_forward, "the perturbation was never applied: the test would prove nothing"
    _check_unperturbed(model, probe)


@pytest.mark.parametrize("variant", list(ONE_PASS))
def test_one_pass_keyboard_interrupt_between_micro_batches_leaves_the_unperturbed_weights(tmp_path, variant):
    model, probe = tiny_bert(), WeightsAfter(STEP - 1)
    fail_training(model, tmp_path, [ONE_PASS[variant](), probe], "between_micro_batches", STEP,
                  error=KeyboardInterrupt, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert probe.perturbed_forward
    _check_unperturbed(model, probe)


@pytest.mark.parametrize(("where", "call"), [
    ("compute_loss", 3),  # the replay of the first micro-batch at w + ε (calls 1, 2: the first pass)
    ("compute_loss", 4),  # the replay's last micro-batch
    ("on_step_begin", 1),
    ("between_micro_batches", 1),
    ("clip", 1),
])
@pytest.mark.parametrize("error", [Failure, KeyboardInterrupt])
def test_exact_sam_failure_leaves_the_unperturbed_weights(tmp_path, where, call, error):
    """Exact SAM perturbs only inside on_pre_optimizer_step, restoring from its saved copy in a finally:
    whatever raises (the replay included, a KeyboardInterrupt too) leaves the weights step k-1 ended with."""
    model, probe = tiny_bert(), WeightsAfter(STEP - 1)
    fail_training(model, tmp_path, [SAMCallback(rho=0.05), probe], where, STEP, error=error, call=call,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert probe.perturbed_forward == (call == 4)  # the replay of micro-batch 1 ran at w + ε
    _check_unperturbed(model, probe)
