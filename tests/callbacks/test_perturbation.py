"""The one-pass perturbation callbacks (robustft/callbacks/perturbation.py) and exact SAM leave exactly the
unperturbed weights when ``train()`` raises anywhere inside a step (DESIGN: temporary weight changes are
always undone, also when a step raises); LoRA-MGPO in a real Trainer equals a plain torch loop written from
the paper's rule."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from robustft import MGPOCallback, MomentumSAMCallback, RandomPerturbationCallback, SAMCallback
from tests.callbacks.failing import INSIDE_STEP, Failure, assert_nothing_attached, fail_training
from tests.callbacks.sam_helpers import MLP, NoisyLinearData, ToyData, make_trainer, sam_loss, tiny_lora_bert
from tests.tiny import tiny_bert

STEP = 2  # the failing optimizer step: MomentumSAM has momentum from step 1 on

ONE_PASS = {
    "msam": lambda: MomentumSAMCallback(rho=0.3),
    "rwp": lambda: RandomPerturbationCallback(rho=0.05, seed=3),
    "mgpo": lambda: MGPOCallback(rho=0.3),
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


# -- LoRA-MGPO against a plain torch loop written from the paper's rule --------------------------------------
def _momentum(opt, p):
    st = opt.state.get(p, {})
    return st.get("exp_avg", st.get("momentum_buffer"))


def _reference_mgpo(model, loss_fn, opt, steps, rho, beta, lora, normalize=True):
    """Per layer l: ε_l = −ρ·v_l/‖v_l‖·min(1/ḡ_l, 10) added for the forward/backward and removed before the
    step; v_l the momentum (LoRA: s·(m_B·A + B·m_A), in weight space), ḡ_l = EMA of the gradient norm in the
    same space, started at the first norm. A layer without momentum yet is not perturbed."""
    if lora:
        layers = [m for m in model.modules() if "default" in getattr(m, "lora_A", {})]
        units = [(m.base_layer.weight, m.lora_B["default"].weight, m.lora_A["default"].weight,
                  m.scaling["default"]) for m in layers]
    else:
        units = [(p, None, None, None) for p in model.parameters()]

    def in_weight_space(unit, get):
        w, b, a, s = unit
        if b is None:
            return get(w)
        db, da = get(b), get(a)
        return None if db is None or da is None else s * (db @ a.detach() + b.detach() @ da)

    ema = {}
    for _ in range(steps):
        opt.zero_grad()
        eps = {}
        for i, unit in enumerate(units):
            v = in_weight_space(unit, lambda p: _momentum(opt, p))
            if v is not None:
                c = min(1.0 / (ema[i] + 1e-12), 10.0) if i in ema and normalize else 1.0
                eps[i] = -rho * v / (torch.linalg.vector_norm(v) + 1e-12) * c
        saved = {i: units[i][0].detach().clone() for i in eps}
        with torch.no_grad():
            for i, e in eps.items():
                units[i][0].add_(e)
        loss_fn().backward()
        with torch.no_grad():
            for i, w in saved.items():
                units[i][0].copy_(w)
        for i, unit in enumerate(units):
            g = torch.linalg.vector_norm(in_weight_space(unit, lambda p: p.grad)).item()
            ema[i] = g if i not in ema else beta * ema[i] + (1 - beta) * g
        opt.step()
    return model


def _assert_close_weights(got, want, atol=2e-5):
    for (n, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=1e-4, msg=n)


def _differ(a, b) -> bool:
    return any(not torch.allclose(p, q, atol=1e-4)
               for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("ga", [1, 2])
def test_mgpo_on_lora_equals_a_plain_torch_loop(tmp_path, ga):
    """PEFT LoRA on a tiny BERT, SGD with momentum, 4 steps (accumulation 1 and 2): the Trainer with
    MGPOCallback ends where the hand-written loop does, and elsewhere than plain training."""
    model = tiny_lora_bert()
    make_trainer(model, tmp_path / "cb", [MGPOCallback(rho=0.3, beta=0.8)], ga=ga, steps=4,
                 lr=0.1).train()
    ref = tiny_lora_bert()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    batch = ToyData().batch()
    _reference_mgpo(ref, lambda: sam_loss(ref, batch, 0.0, scale=ga), opt, 4, rho=0.3, beta=0.8, lora=True)
    _assert_close_weights(model, ref)
    plain = tiny_lora_bert()
    make_trainer(plain, tmp_path / "plain", [], ga=ga, steps=4, lr=0.1).train()
    assert _differ(model, plain)


def test_mgpo_on_a_plain_model_under_adamw_equals_a_plain_torch_loop(tmp_path):
    """Without LoRA layers each trainable tensor is a layer and v is AdamW's exp_avg; ḡ matters (the loop
    without the normalisation ends elsewhere)."""
    from transformers import Trainer

    def run(callbacks, out):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
        args = make_trainer(model, out, [], steps=5).args
        Trainer(model=model, args=args, train_dataset=NoisyLinearData(n=16), callbacks=callbacks,
                optimizers=(opt, None)).train()
        return model

    model = run([MGPOCallback(rho=0.5, beta=0.9)], tmp_path / "cb")
    refs = []
    for normalize in (True, False):
        torch.manual_seed(0)
        ref = MLP()
        data = NoisyLinearData(n=16)
        opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0)
        refs.append(_reference_mgpo(ref, lambda ref=ref, data=data: ref(data.x, data.y)["loss"], opt, 5,
                                    rho=0.5, beta=0.9, lora=False, normalize=normalize))
    _assert_close_weights(model, refs[0])
    assert _differ(refs[0], refs[1])
    assert _differ(model, run([], tmp_path / "plain"))


def test_mgpo_refuses_what_it_cannot_perturb(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        MGPOCallback(beta=1.0)
    with pytest.raises(ValueError, match="max_scale"):
        MGPOCallback(max_scale=0)
    with pytest.raises(ValueError, match="normalize"):
        MGPOCallback(normalize="yes")
    trainer = make_trainer(tiny_lora_bert(), tmp_path, [MGPOCallback(exclude="base_layer")], steps=1)
    with pytest.raises(ValueError, match="leave no LoRA base weight"):
        trainer.train()

