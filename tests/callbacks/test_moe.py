"""The callbacks on a tiny Mixtral (fused 3-D experts, the router ``mlp.gate.weight`` trained like any other
weight), each against an independent reference: SAM against ``sam_helpers.reference_sam``, Momentum-SAM
against its formula as a torch loop, EMA/SWA against
``torch.optim.swa_utils.AveragedModel`` fed the recorded weights, WiSE-FT against its formula on a plain run,
L2-SP/EWC against the penalty added to the loss by autograd, sparse updates by the entries they freeze, and a
PEFT ``target_parameters`` adapter (LoRA on the fused experts) with EMA and ``LoRAArithmeticCallback``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import MixtralConfig, MixtralForSequenceClassification, Trainer, TrainerCallback

from robustft import callbacks
from tests.callbacks.sam_helpers import N_LABELS, VOCAB, ToyData, make_trainer, reference_sam, sam_loss

ROUTER = "model.layers.0.mlp.gate.weight"
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
STEPS, LR = 3, 0.1


def moe_classifier(seed: int = 0) -> MixtralForSequenceClassification:
    """A random-init 1-layer Mixtral classifier (4 experts, top-2) over ``sam_helpers.ToyData``."""
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=32, num_labels=N_LABELS,
                           pad_token_id=VOCAB - 1)
    return MixtralForSequenceClassification(config)


class Recorder(TrainerCallback):
    """The trainable weights after every optimizer step."""

    def __init__(self):
        self.points: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.points.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def run(model, out, cbs, trainer_cls=None, **kw):
    trainer = make_trainer(model, out, cbs, steps=STEPS, lr=LR, **kw)
    if trainer_cls is not None:
        trainer.__class__ = trainer_cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def averaged(points, avg_fn=None) -> dict[str, torch.Tensor]:
    """torch's ``AveragedModel`` fed ``points`` (each a name -> tensor mapping)."""
    names = list(points[0])
    holder = torch.nn.ParameterList([torch.nn.Parameter(points[0][n].clone()) for n in names])
    avg = AveragedModel(holder, multi_avg_fn=avg_fn, use_buffers=False)
    for point in points:
        with torch.no_grad():
            for p, n in zip(holder, names):
                p.copy_(point[n])
        avg.update_parameters(holder)
    return {n: p.detach() for n, p in zip(names, avg.module)}


def test_sam_on_moe_matches_the_two_step_reference(tmp_path):
    model = moe_classifier()
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    got = run(model, tmp_path, [callbacks.SAMCallback(rho=0.05)], max_grad_norm=1.0)
    reference_sam(ref, ToyData().batch(), STEPS, 0.05, False, 0.0, 1.0, LR, 0.9)
    want = dict(ref.named_parameters())
    assert not torch.equal(got[ROUTER], start[ROUTER])  # the router trained (and was perturbed)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w.detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_momentum_sam_on_moe_matches_its_formula(tmp_path):
    """Momentum-SAM (Becker et al. 2024): the gradient at w − ρ·v/‖v‖ (v: SGD's momentum buffer, the norm over
    every weight, router included; the first step plain), clipped, taken back at w: a torch loop."""
    model = moe_classifier()
    ref = copy.deepcopy(model)
    got = run(model, tmp_path, [callbacks.MomentumSAMCallback(rho=0.05)], max_grad_norm=1.0)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    batch = ToyData().batch()
    for _ in range(STEPS):
        buffers = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
        eps = []
        if all(b is not None for b in buffers):
            norm = torch.norm(torch.stack([b.norm() for b in buffers]))
            eps = [-0.05 * b / norm for b in buffers]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        opt.zero_grad()
        sam_loss(ref, batch, 0.0).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        opt.step()
    for n, w in ref.named_parameters():
        torch.testing.assert_close(got[n], w.detach(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["ema", "swa", "lawa"])
def test_averages_on_moe_equal_torch_averaged_model(tmp_path, kind):
    """EMA and SWA against torch's ``AveragedModel``, LAWA (k = 2) against the mean of the last two steps."""
    rec = Recorder()
    cb = {"ema": lambda: callbacks.EMACallback(decay=0.6, copy_to_model_at_end=True),
          "swa": lambda: callbacks.SWACallback(start=1, copy_to_model_at_end=True, update_bn=False),
          "lawa": lambda: callbacks.LAWACallback(k=2, update_every=1, copy_to_model_at_end=True)}[kind]()
    got = run(moe_classifier(), tmp_path, [rec, cb])
    if kind == "lawa":
        want = {n: (rec.points[-2][n] + rec.points[-1][n]) / 2 for n in rec.points[0]}
    else:  # SWA's start=1: every step's weights (steps 1, 2, 3)
        want = averaged(rec.points, get_ema_multi_avg_fn(0.6) if kind == "ema" else None)
    assert not torch.equal(want[ROUTER], rec.points[-1][ROUTER])
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-7, msg=n)


def test_wise_ft_on_moe_interpolates_every_weight_router_included(tmp_path):
    start = dict(moe_classifier().named_parameters())
    end = run(moe_classifier(), tmp_path / "plain", [])
    got = run(moe_classifier(), tmp_path / "wise", [callbacks.WiseFTCallback(alpha=0.3)])
    assert not torch.equal(end[ROUTER], start[ROUTER]) and end[EXPERTS].dim() == 3
    for n, w in got.items():
        torch.testing.assert_close(w, start[n].detach() + 0.3 * (end[n] - start[n].detach()), rtol=1e-5,
                                   atol=1e-6, msg=n)


def penalized_trainer(weights: dict[str, torch.Tensor], strength: float):
    """A Trainer whose loss adds λ/2·Σ F·(θ − θ_start)² (F: ``weights`` per name), by autograd."""

    class Penalized(Trainer):
        start: dict[str, torch.Tensor] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            params = dict(model.named_parameters())
            if not Penalized.start:
                Penalized.start = {n: p.detach().clone() for n, p in params.items()}
            pen = sum((weights[n] * (params[n] - Penalized.start[n]) ** 2).sum() for n in weights)
            return loss + strength / 2 * pen

    return Penalized


@pytest.mark.parametrize("kind", ["l2sp", "ewc"])
def test_anchors_on_moe_equal_the_penalty_by_autograd(tmp_path, kind):
    model = moe_classifier()
    g = torch.Generator().manual_seed(1)
    fisher = {n: (torch.rand(p.shape, generator=g) if kind == "ewc" else torch.ones_like(p))
              for n, p in model.named_parameters()}
    cb = callbacks.EWCCallback(5.0, fisher=fisher) if kind == "ewc" else callbacks.L2SPCallback(5.0)
    # a first step moves θ off θ_start; the anchor pulls from then on
    got = run(model, tmp_path / "cb", [cb])
    want = run(moe_classifier(), tmp_path / "ref", [], trainer_cls=penalized_trainer(fisher, 5.0))
    plain = run(moe_classifier(), tmp_path / "plain", [])
    assert (got[ROUTER] - plain[ROUTER]).abs().max() > 1e-5  # the router is anchored too
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6, msg=n)


def test_sparse_updates_on_moe_freeze_router_and_expert_entries(tmp_path):
    model = moe_classifier()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    got = run(model, tmp_path, [callbacks.SparseUpdateCallback(density=0.25, scores=scores)])
    flat = torch.cat([s.flatten() for s in scores.values()])  # FISH's global top-k (no ties: random scores)
    cut = flat.topk(round(0.25 * flat.numel())).values.min()
    for n in (ROUTER, EXPERTS):
        frozen = scores[n] < cut
        assert frozen.any() and torch.equal(got[n][frozen], start[n][frozen]), n
        assert not torch.equal(got[n][~frozen], start[n][~frozen]), n


def test_lora_on_fused_experts_ema_and_arithmetic(tmp_path):
    """A PEFT adapter with ``target_parameters`` (the fused experts): EMA of its factors equals torch's
    ``AveragedModel``; ``LoRAArithmeticCallback({"self": 0.5})`` writes an adapter whose PEFT delta per expert
    is half the trained one's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import MixtralForCausalLM

    from tests.tiny import lm_dataset, tiny_mixtral, training_args

    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], init_lora_weights=True,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    tiny_mixtral().save_pretrained(tmp_path / "base")
    model = get_peft_model(MixtralForCausalLM.from_pretrained(tmp_path / "base"), config)
    rec = Recorder()
    arithmetic = callbacks.LoRAArithmeticCallback({"self": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=training_args(tmp_path / "out", max_steps=STEPS, learning_rate=5e-2),
                train_dataset=lm_dataset(32),
                callbacks=[rec, callbacks.EMACallback(0.6, copy_to_model_at_end=True), arithmetic]).train()
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    want = averaged(rec.points, get_ema_multi_avg_fn(0.6))
    assert got and all(".lora_" in n for n in got)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-7, msg=n)
    experts = model.base_model.model.model.layers[1].mlp.experts
    trained = {"down": experts.get_delta_weight("default"),  # of the EMA: averages come first at the end
               "gate_up": experts.base_layer.get_delta_weight("default")}
    assert trained["down"].abs().max() > 0  # B moved off zero
    half = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(tmp_path / "base"),
                                     str(arithmetic.output_path))
    loaded = half.base_model.model.model.layers[1].mlp.experts
    torch.testing.assert_close(loaded.get_delta_weight("default"), 0.5 * trained["down"], rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(loaded.base_layer.get_delta_weight("default"), 0.5 * trained["gate_up"],
                               rtol=1e-5, atol=1e-7)
