"""SAM-family callbacks in a real Trainer on tiny models, against references written here."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import TrainerCallback

from robustft import MGPOCallback, MomentumSAMCallback, RandomPerturbationCallback, SAMCallback
from tests.callbacks import sam_helpers
from tests.callbacks.sam_helpers import (
    MLP,
    NoisyLinearData,
    ToyData,
    make_trainer,
    mean_loss_increase,
    reference_sam,
    tiny_bert,
    tiny_lora_bert,
)

RHO, ASAM_RHO, CLIP = 0.05, 0.5, 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one intra-op thread is 3-5x faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _max_diff(a, b) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max((pa[n].detach() - pb[n].detach()).abs().max().item() for n in pa)


@pytest.mark.parametrize(
    ("ga", "adaptive", "smoothing", "lora"),
    [
        (1, False, 0.0, False),
        (4, False, 0.0, False),
        (1, True, 0.0, False),
        (4, True, 0.1, False),
        (2, False, 0.0, True),
    ],
)
def test_sam_matches_two_step_reference(tmp_path, ga, adaptive, smoothing, lora):
    model = tiny_lora_bert() if lora else tiny_bert()
    ref_model = copy.deepcopy(model)
    untouched = copy.deepcopy(model)
    rho = ASAM_RHO if adaptive else RHO
    cb = SAMCallback(rho=rho, adaptive=adaptive, eta=0.01)
    trainer = make_trainer(model, tmp_path, [cb], ga=ga, max_grad_norm=CLIP, label_smoothing_factor=smoothing)
    trainer.train()
    reference_sam(ref_model, ToyData().batch(), 3, rho, adaptive, 0.01, CLIP, 0.1, 0.9, smoothing)
    assert _max_diff(model, untouched) > 1e-3  # it trained
    assert _max_diff(model, ref_model) < 1e-6
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logs) == 3 and all(h["grad_norm"] > CLIP for h in logs)  # clipping was active
    assert all("sam/perturbation_norm" in h and "sam/sharpness" in h for h in logs)
    if not adaptive:
        assert all(abs(h["sam/perturbation_norm"] - rho) < 1e-6 for h in logs)
    assert "training_step" not in trainer.__dict__  # the hook is removed after training


@pytest.mark.parametrize("ga", [1, 2])
def test_sam_without_clipping_matches_reference_and_differs_from_plain(tmp_path, ga):
    model, plain = tiny_bert(), tiny_bert()
    ref_model = copy.deepcopy(model)
    trainer = make_trainer(model, tmp_path / "a", [], ga=ga)
    trainer.add_callback(SAMCallback(rho=RHO).attach(trainer))  # the explicit attach point
    trainer.train()
    make_trainer(plain, tmp_path / "b", [], ga=ga).train()
    reference_sam(ref_model, ToyData().batch(), 3, RHO, False, 0.0, float("inf"), 0.1, 0.9, scale=ga)
    assert _max_diff(model, ref_model) < 1e-6
    assert _max_diff(model, plain) > 1e-5


class BitProbe(TrainerCallback):
    """Records every parameter at the step's first forward (the weights the gradient is taken at: the
    one-pass variants perturb inside ``training_step``), before the optimizer step (after the undo), the
    gradients and SGD momentum buffers seen by the step, and the result."""

    def __init__(self):
        self.begin, self.pre, self.end, self.grads, self.bufs = [], [], [], [], []
        self._want = False

    @staticmethod
    def _snap(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = self._snap(model)

        def first_forward(module, inputs):
            if self._want:
                self._want = False
                self.begin.append(self._snap(model))

        self._hook = model.register_forward_pre_hook(first_forward)

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._want = True

    def on_train_end(self, args, state, control, **kw):
        self._hook.remove()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self.pre.append(self._snap(model))
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        st = optimizer.state
        self.bufs.append(
            {
                n: st[p]["momentum_buffer"].clone()
                for n, p in model.named_parameters()
                if "momentum_buffer" in st.get(p, {})
            }
        )

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.end.append(self._snap(model))


def _bits(t):
    return t.view(torch.int32)


ONE_PASS = {
    "msam": lambda: MomentumSAMCallback(rho=0.3),
    "rwp": lambda: RandomPerturbationCallback(rho=0.05, seed=3),
    "rwp_linear": lambda: RandomPerturbationCallback(rho=0.05, schedule="linear", skip_norm_and_bias=True),
    "flat_lora": lambda: RandomPerturbationCallback(rho=0.05),
    "mgpo": lambda: MGPOCallback(rho=0.3),
}


@pytest.mark.parametrize("variant", list(ONE_PASS))
def test_one_pass_undo_is_bit_exact(tmp_path, variant):
    lora = variant in ("flat_lora", "mgpo")
    model = tiny_lora_bert() if lora else tiny_bert()
    probe = BitProbe()
    lr, mu = 0.1, 0.9
    trainer = make_trainer(model, tmp_path, [ONE_PASS[variant](), probe], ga=2, steps=4, lr=lr, momentum=mu)
    trainer.train()
    perturbed_steps = 0
    for t in range(4):
        before = probe.start if t == 0 else probe.end[t - 1]
        # the optimizer sees exactly the unperturbed weights
        for n, w in before.items():
            assert torch.equal(_bits(probe.pre[t][n]), _bits(w)), (variant, t, n)
        # ... and its update is applied to them: SGD with momentum, recomputed here bit for bit
        for n, g in probe.grads[t].items():
            buf = g.clone() if n not in probe.bufs[t] else probe.bufs[t][n].mul(mu).add_(g)
            expected = probe.pre[t][n].add(buf, alpha=-lr)
            assert torch.equal(_bits(probe.end[t][n]), _bits(expected)), (variant, t, n)
        changed = [n for n in before if not torch.equal(probe.begin[t][n], before[n])]
        perturbed_steps += bool(changed)
        if lora and changed:  # Flat-LoRA and LoRA-MGPO perturb W0 (Flat-LoRA: the merged weight)
            assert all("base_layer.weight" in n for n in changed)
    # the forward really ran at perturbed weights (MSAM and MGPO have no momentum at step 0)
    assert perturbed_steps >= (3 if variant in ("msam", "mgpo") else 4)


def test_flat_lora_noise_scales_with_merged_row_norms(tmp_path):
    model = tiny_lora_bert()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    probe = BitProbe()
    make_trainer(model, tmp_path, [RandomPerturbationCallback(rho=0.05), probe], steps=1).train()
    name = [n for n in probe.start if n.endswith("layer.0.attention.self.query.base_layer.weight")][0]
    eps = probe.begin[0][name] - probe.start[name]
    w0 = probe.start[name]
    merged = w0 + layer.get_delta_weight("default").detach()  # B, A unchanged before the first step
    ratio = eps.norm(dim=1) / merged.norm(dim=1)
    # E‖ε_i‖ ≈ σ‖W'_i‖ for n = 32 columns: the per-row ratio is ≈ σ, and tracks W' rather than W0
    assert ratio.mean().item() == pytest.approx(0.05, rel=0.2)


def test_flat_lora_perturbation_is_the_dense_formula(tmp_path):
    """ε of every LoRA base weight = z ⊙ ρ‖(W0 + s·B·A)_i‖/√n per row, the merged weight formed densely
    (the callback computes the row norms from W0·Aᵀ without forming s·B·A)."""
    from robustft.ops.perturb import row_noise, row_sq_norms, rwp_row_scale

    model = tiny_lora_bert()
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    deltas = {f"{n}.base_layer.weight": m.get_delta_weight("default").detach() for n, m in layers.items()}
    cb, probe = RandomPerturbationCallback(rho=0.05, seed=3), BitProbe()
    make_trainer(model, tmp_path, [cb, probe], steps=1).train()
    assert set(cb._params) == set(deltas)
    for index, name in enumerate(cb._params):
        w0 = probe.start[name]
        scale = rwp_row_scale(row_sq_norms(w0 + deltas[name]), w0.shape, 0.05)
        want = row_noise(w0.shape, scale, cb._seed_for(0, index))
        torch.testing.assert_close(probe.begin[0][name] - w0, want, rtol=1e-4, atol=1e-7, msg=name)


def test_exception_in_step_restores_weights(tmp_path):
    model = tiny_bert()

    class Boom(RuntimeError):
        pass

    class Exploding(torch.nn.Module):
        pass

    cb = RandomPerturbationCallback(rho=0.05)
    trainer = make_trainer(model, tmp_path, [cb], steps=2)
    orig_compute_loss = trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom
        return orig_compute_loss(*a, **k)

    trainer.compute_loss = compute_loss
    snap = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snap.update({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer.add_callback(Snap())
    with pytest.raises(Boom):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snap[n]), n


def test_exception_in_sam_replay_restores_weights(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(model, tmp_path, [SAMCallback(rho=RHO)], steps=1)
    orig = trainer.compute_loss
    calls = {"n": 0}
    seen = {}

    def compute_loss(m, inputs, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the replay at w + eps
            raise RuntimeError("boom in replay")
        seen.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return orig(m, inputs, **k)

    trainer.compute_loss = compute_loss
    with pytest.raises(RuntimeError, match="boom in replay"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), seen[n]), n


def test_nonfinite_gradient_skips_sam_and_warns(tmp_path):
    model = tiny_bert()
    cb = SAMCallback(rho=RHO)

    class PoisonGrad(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    poison = PoisonGrad()
    trainer = make_trainer(model, tmp_path, [cb, poison], steps=1, lr=0.0)
    orig = trainer.training_step

    def training_step(m, inputs, n=None):
        loss = orig(m, inputs, n)
        model.classifier.weight.grad[0, 0] = float("nan")
        return loss

    trainer.training_step = training_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("non-finite gradient" in str(w.message) for w in caught)
    assert any(h.get("sam/skipped_nonfinite") == 1.0 for h in trainer.state.log_history)
    # the weights the optimizer saw were never perturbed
    start = tiny_bert()
    for n, p in poison.before.items():
        assert torch.equal(p, dict(start.named_parameters())[n].detach()), n


class NanAwayFromStart(MLP):
    """An MLP whose loss is NaN whenever its first weight is not the one it had at the step's start:
    finite for the Trainer's own pass, non-finite only for SAM's replay at w + ε."""

    start: torch.Tensor | None = None

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.start is not None and not torch.equal(self.net[0].weight, self.start):
            out["loss"] = out["loss"] * float("nan")
        return out


class MarkStart(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        model.start = model.net[0].weight.detach().clone()


def _mlp_data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    data = NoisyLinearData(n=n)
    return [{"x": data.x[i], "labels": data.y[i]} for i in range(n)]


def test_nonfinite_replay_falls_back_to_the_plain_step(tmp_path):
    """First pass finite, replay at w + ε NaN (loss and gradient): every step is then exactly the step
    plain training takes (clipped first-pass gradient, gradient accumulation), weights stay finite, a
    warning names the step and ``sam/nonfinite_replays`` counts the steps."""
    torch.manual_seed(0)
    model = NanAwayFromStart()
    plain = copy.deepcopy(model)
    data, steps = _mlp_data(), 3
    kw = {"ga": 2, "total_batch": 8, "steps": steps, "max_grad_norm": CLIP, "data": data}
    make_trainer(plain, tmp_path / "plain", [], **kw).train()
    trainer = make_trainer(model, tmp_path / "sam", [SAMCallback(rho=RHO), MarkStart()], **kw)
    with pytest.warns(RuntimeWarning, match="replay at w \\+ ε gave a non-finite loss or gradient at step 0"):
        trainer.train()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, q), n
    counts = [h["sam/nonfinite_replays"] for h in trainer.state.log_history if "sam/nonfinite_replays" in h]
    assert sum(counts) == steps


def test_nonfinite_replay_under_fp16_grad_scaler_takes_the_plain_step(tmp_path, monkeypatch):
    """With fp16's GradScaler the fallback also puts back the scaler's state of the first pass (gradient
    unscaled, no inf found): the scaler steps and keeps its scale, and the weights equal a plain fp16 run."""
    torch.manual_seed(0)
    model = NanAwayFromStart()
    plain = copy.deepcopy(model)
    kw = {"ga": 2, "total_batch": 8, "steps": 2, "data": _mlp_data()}
    for m, cbs, out in ((plain, [], "plain"), (model, [SAMCallback(rho=RHO), MarkStart()], "sam")):
        trainer = make_trainer(m, tmp_path / out, cbs, **kw)
        scaler = _fp16_scaler(trainer, monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            trainer.train()
        assert scaler.get_scale() == 2.0**12  # no step was skipped for an inf
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, q), n


def test_float64_model_is_perturbed_in_float64(tmp_path):
    """SAM on a float64 model: the weights seen by the replay are w + ρ·g/‖g‖ computed densely in float64
    (g the full-batch gradient); a float32 ε is off by ~1e-9, far outside the 1e-15 tolerance."""
    torch.manual_seed(0)
    model = MLP().double()
    start = copy.deepcopy(model)
    raw = NoisyLinearData(n=16)
    data = [{"x": raw.x[i].double(), "labels": raw.y[i]} for i in range(16)]
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append([p.detach().clone() for p in m.parameters()]))
    make_trainer(model, tmp_path, [SAMCallback(rho=RHO)], total_batch=16, steps=1, data=data).train()
    start.zero_grad()
    start(raw.x.double(), raw.y)["loss"].backward()
    grads = [p.grad for p in start.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    expected = [p.detach() + RHO * g / (norm + 1e-12) for p, g in zip(start.parameters(), grads, strict=True)]
    assert len(seen) == 2  # the Trainer's pass, then the replay at w + ε
    for got, want in zip(seen[1], expected, strict=True):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SAMCallback(rho=0), "rho"),
        (lambda: SAMCallback(rho=-0.1), "rho"),
        (lambda: SAMCallback(rho=float("nan")), "rho"),
        (lambda: MomentumSAMCallback(rho=0.0), "rho"),
        (lambda: RandomPerturbationCallback(rho=-1), "rho"),
        (lambda: MGPOCallback(rho=0), "rho"),
        (lambda: SAMCallback(schedule="cosine"), "schedule"),
        (lambda: SAMCallback(start_step=-1), "start_step"),
        (lambda: SAMCallback(eta=-1.0), "eta"),
        (lambda: RandomPerturbationCallback(lora="merged"), "lora"),
    ],
)
def test_bad_options_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_selection_and_lora_without_lora_raise(tmp_path):
    with pytest.raises(ValueError, match="include"):
        make_trainer(tiny_bert(), tmp_path, [SAMCallback(include="no_such_layer")]).train()
    with pytest.raises(ValueError, match="LoRA"):
        make_trainer(tiny_bert(), tmp_path, [RandomPerturbationCallback(lora=True)]).train()


def test_attach_rejects_non_trainer():
    with pytest.raises(ValueError, match="Trainer"):
        SAMCallback().attach(object())


@pytest.mark.slow
def test_sam_ends_in_a_flatter_minimum_than_plain_training(tmp_path):
    """Measured, not constructed: same seed, same data, plain vs SAM; loss increase under random
    weight perturbations of fixed radius, averaged over 100 directions (both fit the data)."""
    ratios = []
    for seed in (0, 1, 2):
        data = NoisyLinearData(seed=seed)
        runs = {}
        for name, cbs in (("plain", []), ("sam", [SAMCallback(rho=0.1)])):
            torch.manual_seed(seed)
            model = MLP()
            make_trainer(model, tmp_path / name, cbs, total_batch=128, steps=300, data=data).train()
            runs[name] = model
        for radius in (1.0, 2.0):
            plain = mean_loss_increase(runs["plain"], data, radius)
            sam = mean_loss_increase(runs["sam"], data, radius)
            assert sam < plain, (seed, radius, sam, plain)
            ratios.append(sam / plain)
        for model in runs.values():
            assert model(data.x, data.y)["loss"].item() < 0.01  # both reached a minimum of the training loss
    assert sum(ratios) / len(ratios) < 0.9, ratios


def test_sam_replay_runs_under_the_trainers_bf16_autocast(tmp_path, monkeypatch):
    model = tiny_bert()
    ref_bf16, ref_fp32 = copy.deepcopy(model), copy.deepcopy(model)
    make_trainer(model, tmp_path, [SAMCallback(rho=RHO)], max_grad_norm=CLIP, bf16=True).train()
    reference_sam(ref_fp32, ToyData().batch(), 3, RHO, False, 0.0, CLIP, 0.1, 0.9)
    plain_loss = sam_helpers.sam_loss

    def autocast_loss(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain_loss(*a, **k)

    monkeypatch.setattr(sam_helpers, "sam_loss", autocast_loss)
    reference_sam(ref_bf16, ToyData().batch(), 3, RHO, False, 0.0, CLIP, 0.1, 0.9)
    # both passes ran in bf16 autocast: equal to a bf16-autocast reference, not to the fp32 one
    assert _max_diff(model, ref_bf16) < 1e-6
    assert _max_diff(model, ref_fp32) > 1e-6


def test_one_pass_undo_is_bit_exact_on_bf16_weights(tmp_path):
    model = tiny_bert().to(torch.bfloat16)
    probe = BitProbe()
    make_trainer(model, tmp_path, [RandomPerturbationCallback(rho=0.05), probe], ga=2, steps=2).train()
    for t in range(2):
        before = probe.start if t == 0 else probe.end[t - 1]
        for n, w in before.items():
            assert torch.equal(probe.pre[t][n].view(torch.int16), w.view(torch.int16)), (t, n)
        assert any(not torch.equal(probe.begin[t][n], before[n]) for n in before)


def test_sam_with_fp16_grad_scaler_unscales_the_second_gradient(tmp_path, monkeypatch):
    """accelerate only builds a GradScaler for fp16 on accelerators; this test gives the CPU Trainer
    the same wiring (a torch.amp.GradScaler on the accelerator and on its optimizer, mixed precision
    'fp16'), so the scaled backward, unscale and scaler.step/update path of a GPU fp16 run is
    exercised. Unscaling twice in one step would raise; a second gradient left scaled (x4096,
    no clipping here) would be far off the reference. Measured: under this wiring even a plain run
    differs from the fp32 reference by ~1.5e-5, hence the tolerance."""
    model = tiny_bert()
    ref_model = copy.deepcopy(model)
    trainer = make_trainer(model, tmp_path, [SAMCallback(rho=RHO)], ga=2)
    scaler = _fp16_scaler(trainer, monkeypatch)
    updates = []
    orig_update = scaler.update
    monkeypatch.setattr(scaler, "update", lambda *a: (updates.append(scaler.get_scale()), orig_update(*a)))
    trainer.train()
    reference_sam(ref_model, ToyData().batch(), 3, RHO, False, 0.0, float("inf"), 0.1, 0.9, scale=2)
    assert updates == [2.0**12] * 3  # the scaler stepped and updated every step, no inf found
    assert _max_diff(model, ref_model) < 1e-4


def _fp16_scaler(trainer, monkeypatch) -> torch.amp.GradScaler:
    """Give a CPU Trainer the wiring of a GPU fp16 run: a GradScaler on the accelerator and its optimizer."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc = trainer.accelerator
    monkeypatch.setattr(acc, "scaler", scaler)
    monkeypatch.setattr(acc, "native_amp", True)
    monkeypatch.setattr(acc.state, "_mixed_precision", "fp16")
    orig_prepare = acc.prepare

    def prepare(*objs, **kw):
        out = orig_prepare(*objs, **kw)
        for o in out if isinstance(out, tuple) else (out,):
            if hasattr(o, "scaler") and hasattr(o, "optimizer"):
                o.scaler = scaler  # AcceleratedOptimizer: scaler.step + update
        return out

    monkeypatch.setattr(acc, "prepare", prepare)
    return scaler


def test_mgpo_resume_equals_uninterrupted_run(tmp_path):
    """LoRA-MGPO keeps ḡ, the EMA of each layer's gradient norm: it is saved with the checkpoint and read
    back, so a run resumed at step 2 ends where an uninterrupted 4-step run ends."""
    full = tiny_lora_bert()
    make_trainer(full, tmp_path / "full", [MGPOCallback(rho=0.05)], steps=4).train()

    first = tiny_lora_bert()
    kw = dict(steps=4, save_strategy="steps", save_steps=2)
    trainer = make_trainer(first, tmp_path / "cut", [MGPOCallback(rho=0.05)], **kw)
    trainer.train()
    assert (tmp_path / "cut" / "checkpoint-2" / "robustft").is_dir()
    resumed = tiny_lora_bert()
    make_trainer(resumed, tmp_path / "cut", [MGPOCallback(rho=0.05)], **kw).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")
    )
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    # and without the saved ḡ the run would differ: the state matters
    stateless = tiny_lora_bert()
    cb = MGPOCallback(rho=0.05, restart_if_missing=True)
    cb.has_state = False
    make_trainer(stateless, tmp_path / "cut", [cb], **kw).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")
    )
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), stateless.parameters(), strict=True))


def test_nonfinite_perturbation_is_undone_exactly_and_warns():
    from types import SimpleNamespace

    w = torch.nn.Parameter(torch.randn(4, 6))
    with torch.no_grad():
        w[1, 2] = float("nan")  # its row scale, hence that row's noise, is NaN
    before = w.detach().clone()
    cb = RandomPerturbationCallback(rho=0.05)
    cb._params = {"w": w}
    state = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.warns(RuntimeWarning, match="non-finite perturbation"):
        cb.on_step_begin(None, state, None)
    assert torch.equal(w.detach().view(torch.int32), before.view(torch.int32))
    assert cb.pending_logs["rwp/skipped_nonfinite"] == 1.0 and not cb._applied


def test_nonfinite_momentum_skips_msam_and_warns():
    from types import SimpleNamespace

    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = torch.full_like(w, float("inf"))
    before = w.detach().clone()
    cb = MomentumSAMCallback(rho=0.3)
    cb._params = {"w": w}
    with pytest.warns(RuntimeWarning, match="non-finite momentum"):
        cb.on_step_begin(None, SimpleNamespace(global_step=3, max_steps=10), None, optimizer=opt)
    assert torch.equal(w.detach(), before) and not cb._applied


def test_sam_include_and_start_step_match_reference(tmp_path):
    model = tiny_bert()
    ref_model = copy.deepcopy(model)
    cb = SAMCallback(rho=RHO, include=r"encoder\.layer\.1\.", start_step=1)
    trainer = make_trainer(model, tmp_path, [cb], ga=2, max_grad_norm=CLIP)
    trainer.train()
    reference_sam(
        ref_model, ToyData().batch(), 3, RHO, False, 0.0, CLIP, 0.1, 0.9, only="encoder.layer.1.", start=1
    )
    assert _max_diff(model, ref_model) < 1e-6
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert ["sam/sharpness" in h for h in logs] == [False, True, True]
