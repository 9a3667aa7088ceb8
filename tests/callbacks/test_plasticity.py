"""ShrinkPerturbCallback on a real Trainer: θ ← λθ + σε at the right steps with ε regenerated from the seed
(checked against a dense computation with an independent generator), task boundaries, resume, options.
ContinualBackpropCallback: a Trainer run equals a plain torch loop written from the paper's Algorithm 1; the
hidden units it finds in BERT, GPT-2 and Llama are the ones their MLPs compute; refusals."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback

from robustft import ContinualBackpropCallback, ShrinkPerturbCallback
from robustft.callbacks.plasticity import hidden_layers
from robustft.ops.perturb import noise_seed
from robustft.ops.plasticity import replace_units_
from tests.callbacks.sam_helpers import MLP, NoisyLinearData, make_trainer
from tests.tiny import tiny_bert, tiny_gpt2, tiny_llama, token_dataset, training_args


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


# -- continual backprop -------------------------------------------------------------------------------------
def _reference_cbp(steps, rate, maturity, decay, seed, lr=0.1, momentum=0.9):
    """Algorithm 1 (Dohare et al., Nature 2024) on the MLP's two hidden layers, full batch, SGD with momentum:
    after each step, ages += 1, u ← ηu + (1 − η)·mean|h|·Σ_k|w_out[k, i]|, c += ρ·#(age > m), and the ⌊c⌋
    mature units of lowest u/(1 − η^age) get new incoming weights U(±1/√fan_in) (drawn from
    noise_seed(seed, step, layer << 8) mapped through the normal CDF), zero bias, zero outgoing weights,
    u = age = 0 and zero momentum."""
    torch.manual_seed(0)
    model, data = MLP(), NoisyLinearData(n=16)
    lin = [model.net[0], model.net[2], model.net[4]]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    util = [torch.zeros(64, dtype=torch.float64) for _ in range(2)]
    ages = [torch.zeros(64, dtype=torch.long) for _ in range(2)]
    count = [0.0, 0.0]
    for step in range(1, steps + 1):
        opt.zero_grad()
        h1 = torch.tanh(lin[0](data.x))
        h2 = torch.tanh(lin[1](h1))
        torch.nn.functional.cross_entropy(lin[2](h2), data.y).backward()
        opt.step()
        for j, h in enumerate([h1, h2]):
            ages[j] += 1
            outgoing = lin[j + 1].weight.detach().double().abs().sum(0)
            contribution = h.detach().double().abs().mean(0) * outgoing
            util[j] = decay * util[j] + (1 - decay) * contribution
            ranking = util[j] / (1 - decay ** ages[j].double())
            mature = [i for i in range(64) if ages[j][i] > maturity]
            count[j] += rate * len(mature)
            k = int(count[j])
            count[j] -= k
            if not k:
                continue
            pick = sorted(sorted(mature, key=lambda i: (ranking[i].item(), i))[:k])
            g = torch.Generator().manual_seed(noise_seed(seed, step, j << 8))
            z = torch.randn(k, lin[j].in_features, generator=g)
            fresh = (0.5 * (1 + torch.erf(z / math.sqrt(2))) * 2 - 1) / math.sqrt(lin[j].in_features)
            with torch.no_grad():
                lin[j].weight[pick] = fresh
                lin[j].bias[pick] = 0
                lin[j + 1].weight[:, pick] = 0
                opt.state[lin[j].weight]["momentum_buffer"][pick] = 0
                opt.state[lin[j].bias]["momentum_buffer"][pick] = 0
                opt.state[lin[j + 1].weight]["momentum_buffer"][:, pick] = 0
            util[j][pick] = 0
            ages[j][pick] = 0
    return model


@pytest.mark.parametrize("ga", [1, 2])
def test_continual_backprop_equals_a_plain_torch_loop(tmp_path, ga):
    """6 steps of the MLP (64 + 64 hidden units, ρ = 0.05, m = 2: about 3 units per layer per step once
    mature) through the Trainer equal the hand-written loop, accumulation 1 and 2 (|h| averaged over the
    step's micro-batches); and units were replaced (the run differs from plain training)."""
    kw = dict(replacement_rate=0.05, maturity_threshold=2, decay=0.9, seed=3)
    torch.manual_seed(0)
    model = MLP()
    cb = ContinualBackpropCallback(**kw)
    trainer = make_trainer(model, tmp_path / "cb", [cb], ga=ga, steps=6, data=NoisyLinearData(n=16))
    trainer.train()
    want = _reference_cbp(6, 0.05, 2, 0.9, 3)
    for (n, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-5, rtol=1e-4, msg=n)
    replaced = sum(h.get("cbp/replaced", 0) for h in trainer.state.log_history)
    # steps 3-6, per layer: c = 0.05·64 = 3.2, then 0.05·61 + 0.2, 0.05·58 + 0.25, 0.05·58 + 0.15: 3 each
    assert replaced == 2 * (3 + 3 + 3 + 3)
    assert "training_step" not in trainer.__dict__


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2, tiny_llama], ids=["bert", "gpt2", "llama"])
def test_hidden_units_are_the_ones_the_mlp_computes(make):
    """Zeroing unit 3's outgoing weights (and changing its incoming ones) gives the same output as masking
    h_3 in the forward pass: the units, their incoming and outgoing weights are found on the right axes."""
    model = make().eval()
    layer = hidden_layers(model)[0]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def mask(module, inputs):
        h = inputs[0].clone()
        h[..., 3] = 0
        return (h,)

    handle = layer.reader.register_forward_pre_hook(mask)
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    handle.remove()
    units = torch.tensor([3])
    fresh = []
    for _, w, axis in layer.incoming:
        shape = list(w.shape)
        shape[axis] = 1
        fresh.append((w, axis, torch.randn(shape)))
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        replace_units_(fresh, [b for _, b in layer.biases], layer.outgoing[1:], units)
        got = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (before - want).abs().max() > 1e-4  # unit 3 mattered


def test_continual_backprop_refuses_what_it_cannot_reinitialise(tmp_path):
    with pytest.raises(ValueError, match="no hidden layer"):
        hidden_layers(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    model = tiny_bert()
    for p in model.bert.encoder.layer[0].output.dense.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=token_dataset(),
                      callbacks=[ContinualBackpropCallback()])
    with pytest.raises(ValueError, match=r"layer\.0\.output\.dense\.weight is frozen"):
        trainer.train()
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=1),
                      train_dataset=token_dataset(), callbacks=[ContinualBackpropCallback(include="nothing")])
    with pytest.raises(ValueError, match="leave no hidden layer"):
        trainer.train()


@pytest.mark.parametrize("kwargs, option", [
    (dict(replacement_rate=0), "replacement_rate"),
    (dict(replacement_rate=1.5), "replacement_rate"),
    (dict(maturity_threshold=-1), "maturity_threshold"),
    (dict(maturity_threshold=2.5), "maturity_threshold"),
    (dict(decay=1.0), "decay"),
    (dict(init="xavier"), "init"),
    (dict(init=0.0), "init"),
    (dict(bias_correction="yes"), "bias_correction"),
    (dict(include="("), "include"),
])
def test_continual_backprop_bad_option_is_refused_at_construction(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ContinualBackpropCallback(**kwargs)
