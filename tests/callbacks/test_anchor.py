"""Anchor penalty callbacks through a real Trainer: the penalty's gradient enters each optimizer step once
(gradient accumulation 1 and 2, a model the Trainer divides the loss for and one it does not), trained weights
equal a plain torch loop, λ = 0 changes nothing, bad options fail at construction, resume equals one run."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from robustft import EWCCallback, L2SPCallback, SpectralRegCallback, WassersteinRegCallback
from robustft.merge import estimate_fisher
from tests.callbacks.sam_helpers import MLP, NoisyLinearData, make_trainer, tiny_bert

LAM = 0.3


class Probe(TrainerCallback):
    """Moves the weights away from the start the anchor recorded (listed after it), then keeps the first
    step's weights and gradients, before the optimizer uses them."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def _fisher(model):
    g = torch.Generator().manual_seed(3)
    return {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in model.named_parameters()}


def _spectral_grad(w, w0, power=2):
    """d/dW (σ₁(W)^k − σ₁(W₀)^k)² by a full SVD in float64."""
    m = w.double().reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(m)
    tau = torch.linalg.svdvals(w0.double().reshape(w0.shape[0], -1))[0]
    g = 2 * (s[0] ** power - tau**power) * power * s[0] ** (power - 1) * torch.outer(u[:, 0], vh[0])
    return g.reshape(w.shape).float()


def _wasserstein_grad(w, w0):
    """d/dθ Σ_i (θ_(i) − θ⁰_(i))²: each entry minus the initial entry of the same rank, twice (by ranks)."""
    flat = w.double().reshape(-1)
    rank = torch.empty_like(flat, dtype=torch.long)
    rank[torch.argsort(flat)] = torch.arange(flat.numel())
    return (2 * (flat - torch.sort(w0.double().reshape(-1)).values[rank])).reshape(w.shape).float()


def _model(kind):
    if kind == "mlp":
        torch.manual_seed(0)
        return MLP(), NoisyLinearData(n=16)
    return tiny_bert(0), None


def _first_grads(tmp_path, kind, callback, ga, **extra):
    model, data = _model(kind)
    probe = Probe()
    callbacks = [probe] if callback is None else [callback(model), probe]
    make_trainer(model, tmp_path, callbacks, ga=ga, steps=1, data=data, **extra).train()
    return probe


PENALTIES = {
    "l2sp": (lambda model: L2SPCallback(LAM), lambda w, w0, n, f: LAM * (w - w0)),
    "ewc": (lambda model: EWCCallback(LAM, fisher=_fisher(model)), lambda w, w0, n, f: LAM * f[n] * (w - w0)),
    "spectral": (lambda model: SpectralRegCallback(LAM),
                 lambda w, w0, n, f: LAM * _spectral_grad(w, w0) if w.ndim >= 2 else torch.zeros_like(w)),
    "wasserstein": (lambda model: WassersteinRegCallback(LAM),
                    lambda w, w0, n, f: LAM * _wasserstein_grad(w, w0)),
}


# the Trainer divides the MLP's loss by GA, not BERT's (given num_items_in_batch): the scaling branch does not
# depend on the penalty, so BERT runs L2-SP only (a spectral penalty on BERT costs an SVD per matrix)
@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("penalty, kind", [(p, "mlp") for p in sorted(PENALTIES)] + [("l2sp", "bert")])
def test_penalty_gradient_enters_each_step_once(tmp_path, penalty, kind, ga):
    make, grad = PENALTIES[penalty]
    with_penalty = _first_grads(tmp_path / "a", kind, make, ga)
    plain = _first_grads(tmp_path / "b", kind, None, ga)
    fisher = _fisher(_model(kind)[0])
    for name, g in with_penalty.grads.items():
        w, w0 = with_penalty.weights[name], with_penalty.start[name]
        assert torch.equal(w, plain.weights[name])
        torch.testing.assert_close(g - plain.grads[name], grad(w, w0, name, fisher), atol=2e-6, rtol=1e-4)


def test_penalty_gradient_under_bf16_autocast(tmp_path):
    """Under bf16 autocast (really run on CPU) the penalty, computed in float32, still adds λ(θ − θ₀) once."""
    with_penalty = _first_grads(tmp_path / "a", "mlp", PENALTIES["l2sp"][0], 2, bf16=True)
    plain = _first_grads(tmp_path / "b", "mlp", None, 2, bf16=True)
    for name, g in with_penalty.grads.items():
        want = LAM * (with_penalty.weights[name] - with_penalty.start[name])
        torch.testing.assert_close(g - plain.grads[name], want, atol=2e-6, rtol=1e-4)


def test_penalty_gradient_is_clipped_with_the_data_gradient(tmp_path):
    """max_grad_norm clips the sum (data + penalty), as weight decay written in the loss would be."""
    with_penalty = _first_grads(tmp_path / "a", "mlp", PENALTIES["l2sp"][0], 1, max_grad_norm=0.1)
    plain = _first_grads(tmp_path / "b", "mlp", None, 1)
    total = {n: g + LAM * (with_penalty.weights[n] - with_penalty.start[n]) for n, g in plain.grads.items()}
    norm = torch.sqrt(sum((g**2).sum() for g in total.values()))
    assert norm > 0.1
    for name, g in with_penalty.grads.items():
        torch.testing.assert_close(g, total[name] * (0.1 / norm), atol=1e-6, rtol=1e-4)


def _reference_l2sp(steps, lr=0.1, momentum=0.9, decoupled=False, adamw=None):
    """Full-batch plain torch: SGD (or AdamW with weight decay ``adamw``) on mean CE + λ/2·‖θ − θ₀‖², or
    the decoupled form: the pull lr·λ·(θ_t − θ₀) of the pre-step θ_t subtracted after the update, as AdamW
    decays the pre-step θ (θ_t·(1 − lr·wd) in torch.optim.AdamW)."""
    torch.manual_seed(0)
    model, data = MLP(), NoisyLinearData(n=16)
    start = [p.detach().clone() for p in model.parameters()]
    if adamw is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    else:
        named = list(model.named_parameters())  # as the Trainer: no weight decay on biases
        groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": adamw},
                  {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(data.x, data.y)["loss"]
        if not decoupled:
            loss = loss + LAM / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
        loss.backward()
        pulls = [lr * LAM * (p.detach() - s) for p, s in zip(model.parameters(), start)]
        opt.step()
        if decoupled:
            with torch.no_grad():
                for p, d in zip(model.parameters(), pulls):
                    p.sub_(d)
    return dict(model.named_parameters())


def _assert_weights(model, want, atol=1e-6):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name].detach(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("ga", [1, 2])
def test_l2sp_weights_equal_a_plain_torch_loop(tmp_path, ga, decoupled):
    torch.manual_seed(0)
    model = MLP()
    make_trainer(model, tmp_path, [L2SPCallback(LAM, decoupled=decoupled)], ga=ga, steps=4,
                 data=NoisyLinearData(n=16)).train()
    _assert_weights(model, _reference_l2sp(4, decoupled=decoupled))


@pytest.mark.parametrize("decoupled", [False, True])
def test_l2sp_under_adamw_with_weight_decay_equals_a_plain_torch_loop(tmp_path, decoupled):
    """The Trainer's own AdamW (weight decay 0.05 on the weight matrices): the decoupled pull is taken on the
    same pre-step θ AdamW decays, and subtracted after the whole update."""
    torch.manual_seed(0)
    model = MLP()
    args = dict(optim="adamw_torch", weight_decay=0.05, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    trainer = make_trainer(model, tmp_path, [L2SPCallback(LAM, decoupled=decoupled)], steps=4, lr=0.01,
                           data=NoisyLinearData(n=16), **args)
    trainer.optimizer = None  # make_trainer's SGD out: the Trainer builds AdamW from the arguments
    trainer.create_optimizer = type(trainer).create_optimizer.__get__(trainer)
    trainer.train()
    want = _reference_l2sp(4, lr=0.01, decoupled=decoupled, adamw=0.05)
    _assert_weights(model, want)


def test_decoupled_and_loss_forms_give_the_same_step_under_plain_sgd(tmp_path):
    """The sentence in docs/regularizers.md: SGD without momentum, θ − lr·g − lr·λ(θ − θ₀) either way (it was
    off by lr²·λ·g when the pull read the updated θ)."""
    models = []
    for decoupled in (False, True):
        torch.manual_seed(0)
        model = MLP()
        make_trainer(model, tmp_path / str(decoupled), [L2SPCallback(LAM, decoupled=decoupled)], steps=4,
                     momentum=0.0, data=NoisyLinearData(n=16)).train()
        models.append(model)
    _assert_weights(models[1], dict(models[0].named_parameters()), atol=1e-7)
    _assert_weights(models[1], _reference_l2sp(4, momentum=0.0), atol=1e-7)


def test_decoupled_pull_ignores_the_order_of_a_one_pass_perturbation(tmp_path):
    """A perturbation undone at on_pre_optimizer_step, listed before or after: the pull reads the unperturbed
    θ either way."""
    from robustft import RandomPerturbationCallback

    results = []
    for order in (0, 1):
        torch.manual_seed(0)
        model = MLP()
        callbacks = [L2SPCallback(LAM, decoupled=True), RandomPerturbationCallback(0.05, seed=3)]
        make_trainer(model, tmp_path / str(order), callbacks[::-1] if order else callbacks, steps=3,
                     data=NoisyLinearData(n=16)).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p in results[0].items():
        assert torch.equal(p, results[1][name]), name


def test_a_skipped_step_gets_no_pull(tmp_path, monkeypatch):
    """As AdamW's decay: when the GradScaler skips the update (fp16 overflow), nothing is pulled either."""
    from accelerate.optimizer import AcceleratedOptimizer

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: True))
    trained = []
    for callbacks in ([L2SPCallback(LAM, decoupled=True)], []):
        torch.manual_seed(0)
        model = MLP()
        out = tmp_path / str(len(callbacks))
        make_trainer(model, out, callbacks, steps=3, data=NoisyLinearData(n=16)).train()
        trained.append(model)
    for (n, p), q in zip(trained[0].named_parameters(), trained[1].parameters()):
        assert torch.equal(p, q), n


def test_l2sp_reference_differs_from_plain_training():
    """The loop above is a real check: without the penalty the weights end elsewhere."""
    a, b = _reference_l2sp(4), _reference_l2sp(4, decoupled=True)
    torch.manual_seed(0)
    model, data = MLP(), NoisyLinearData(n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        model(data.x, data.y)["loss"].backward()
        opt.step()
    for name, p in model.named_parameters():
        assert not torch.allclose(p, a[name], atol=1e-4)
        assert not torch.allclose(p, b[name], atol=1e-4)


def _train_mlp(tmp_path, callbacks, steps=4, **kw):
    torch.manual_seed(0)
    model = MLP()
    trainer = make_trainer(model, tmp_path, callbacks, steps=steps, data=NoisyLinearData(n=64), **kw)
    return trainer, model


@pytest.mark.parametrize("make", [
    lambda: L2SPCallback(0.0), lambda: L2SPCallback(0.0, decoupled=True),
    lambda: EWCCallback(0.0, fisher_data=[{"x": torch.ones(2, 10), "labels": torch.ones(2).long()}]),
    lambda: SpectralRegCallback(0.0), lambda: WassersteinRegCallback(0.0),
], ids=["l2sp", "l2sp_decoupled", "ewc", "spectral", "wasserstein"])
def test_zero_strength_is_bit_identical_to_plain_training(tmp_path, make):
    trainer, model = _train_mlp(tmp_path / "a", [make()])
    trainer.train()
    plain_trainer, plain = _train_mlp(tmp_path / "b", [])
    plain_trainer.train()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    assert "compute_loss" not in trainer.__dict__


def test_wrapper_removed_and_evaluation_loss_unpenalized(tmp_path):
    cb = L2SPCallback(100.0)
    trainer, model = _train_mlp(tmp_path, [cb], eval_strategy="no")
    trainer.train()
    assert "compute_loss" not in trainer.__dict__  # unwrapped at the end
    data = NoisyLinearData(n=64)
    want = model(data.x, data.y)["loss"].item()
    assert trainer.evaluate(eval_dataset=data)["eval_loss"] == pytest.approx(want, rel=1e-5)
    logged = [h["l2sp/penalty"] for h in trainer.state.log_history if "l2sp/penalty" in h]
    assert len(logged) == 4 and logged[-1] > 0


def test_ewc_estimates_the_fisher_at_train_begin(tmp_path):
    data = NoisyLinearData(n=64)
    batches = [{"x": data.x[i : i + 8], "labels": data.y[i : i + 8]} for i in range(0, 24, 8)]
    cb = EWCCallback(LAM, fisher_data=batches, fisher_max_examples=20)
    trainer, _ = _train_mlp(tmp_path, [cb], steps=1)
    torch.manual_seed(0)
    want = estimate_fisher(MLP(), batches, max_examples=20)
    trainer.train()
    for name, f in zip(cb.fisher.names, cb.fisher.tensors):
        torch.testing.assert_close(f, want[name])


def test_ewc_fisher_must_cover_the_selection(tmp_path):
    torch.manual_seed(0)
    fisher = {n: torch.ones(p.shape) for n, p in MLP().named_parameters() if "4" not in n}
    trainer, _ = _train_mlp(tmp_path, [EWCCallback(LAM, fisher=fisher)])
    with pytest.raises(ValueError, match="net.4.weight"):
        trainer.train()


@pytest.mark.parametrize("make, match", [
    (lambda: L2SPCallback(-1.0), "strength"),
    (lambda: L2SPCallback(float("nan")), "strength"),
    (lambda: L2SPCallback(True), "strength"),
    (lambda: L2SPCallback(0.1, decoupled="yes"), "decoupled"),
    (lambda: L2SPCallback(0.1, dtype="int8"), "dtype"),
    (lambda: EWCCallback(0.1), "exactly one of fisher"),
    (lambda: EWCCallback(0.1, fisher={"a": torch.ones(1)}, fisher_data=[{}]), "exactly one of fisher"),
    (lambda: EWCCallback(0.1, fisher={"a": -torch.ones(1)}), "fisher: tensor 'a'"),
    (lambda: EWCCallback(0.1, fisher={"a": 1.0}), "fisher must map"),
    (lambda: EWCCallback(0.1, fisher_data=[{}], fisher_max_examples=0), "fisher_max_examples"),
    (lambda: EWCCallback(0.1, fisher_data=[{}], fisher_loss_fn=3), "fisher_loss_fn"),
    (lambda: SpectralRegCallback(0.1, power=0), "power"),
    (lambda: SpectralRegCallback(0.1, power=1.5), "power"),
    (lambda: SpectralRegCallback(0.1, target="init"), "target"),
    (lambda: L2SPCallback(0.1, restart_if_missing="no"), "restart_if_missing"),
    (lambda: WassersteinRegCallback(-0.5), "strength"),
    (lambda: WassersteinRegCallback(0.1, include="("), "include"),
])
def test_bad_options_are_named_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_spectral_needs_a_matrix(tmp_path):
    trainer, _ = _train_mlp(tmp_path, [SpectralRegCallback(LAM, include="bias")])
    with pytest.raises(ValueError, match="no selected parameter is a matrix"):
        trainer.train()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _fisher_batches():
    data = NoisyLinearData(n=64, seed=1)
    return [{"x": data.x[:16], "labels": data.y[:16]}]


@pytest.mark.parametrize("make", [
    lambda: L2SPCallback(LAM),
    lambda: L2SPCallback(LAM, decoupled=True),
    lambda: EWCCallback(3.0, fisher_data=_fisher_batches()),
    lambda: SpectralRegCallback(LAM),
    lambda: WassersteinRegCallback(LAM),
], ids=["l2sp", "l2sp_decoupled", "ewc", "spectral", "wasserstein"])
def test_resume_equals_an_uninterrupted_run(tmp_path, make):
    full_trainer, full = _train_mlp(tmp_path / "full", [make()])
    full_trainer.train()
    part_trainer, _ = _train_mlp(tmp_path / "part", [make(), StopAt(2)], save_strategy="steps", save_steps=2)
    part_trainer.train()
    resumed_trainer, resumed = _train_mlp(tmp_path / "part", [make()])
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    # the state mattered: the resumed run's own start (the checkpoint's weights) would give other weights
    fresh_trainer, fresh = _train_mlp(tmp_path / "fresh", [make()], steps=2)
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), part_trainer.model.parameters()):
            p.copy_(q)
    fresh_trainer.train()
    assert any(not torch.allclose(p, q) for p, q in zip(fresh.parameters(), full.parameters()))


def test_decoupled_is_refused_under_deepspeed_before_the_first_step(tmp_path, monkeypatch):
    """DeepSpeed steps its own fp32 master weights: a pull on the model's weights would be overwritten."""
    from robustft.core import distributed

    monkeypatch.setattr(distributed, "deepspeed_stage", lambda obj: 2)
    trainer, model = _train_mlp(tmp_path, [L2SPCallback(LAM, decoupled=True)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"decoupled=True\) does not support DeepSpeed"):
        trainer.train()
    assert trainer.state.global_step == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _reference_wasserstein(steps, lr=0.1, momentum=0.9):
    """Full-batch plain torch: SGD on mean CE + λ·Σ_t Σ_i (θ_t,(i) − θ⁰_t,(i))², the sorted initial entries
    taken before the first step (the penalty written here with argsort, not robustft's sort)."""
    torch.manual_seed(0)
    model, data = MLP(), NoisyLinearData(n=16)
    flat = [p.detach().reshape(-1) for p in model.parameters()]
    start = [f[torch.argsort(f)].clone() for f in flat]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(data.x, data.y)["loss"]
        for p, s in zip(model.parameters(), start):
            flat = p.reshape(-1)
            loss = loss + LAM * (flat[torch.argsort(flat.detach())] - s).square().sum()
        loss.backward()
        opt.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("ga", [1, 2])
def test_wasserstein_weights_equal_a_plain_torch_loop(tmp_path, ga):
    torch.manual_seed(0)
    model = MLP()
    make_trainer(model, tmp_path, [WassersteinRegCallback(LAM)], ga=ga, steps=4,
                 data=NoisyLinearData(n=16)).train()
    want = _reference_wasserstein(4)
    _assert_weights(model, want)
    # anchoring the distribution is not anchoring each weight: L2-SP of the same strength ends elsewhere
    l2sp = _reference_l2sp(4).values()
    assert any(not torch.allclose(p, q, atol=1e-4) for p, q in zip(want.values(), l2sp))
