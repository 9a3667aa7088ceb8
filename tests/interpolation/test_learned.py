"""LearnedInterpolation against independent references: a fine α grid (one task vector, one block), a
hand-written entropy-minimisation loop, the dense formula, saved/reloaded coefficients and checkpoints."""

import copy
import fractions

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustft.interpolation.learned import LearnedInterpolation
from robustft.interpolation.wise_ft import interpolate_models
from tests.tiny import tiny_bert, tiny_llama


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _perturbed(model, seed, scale=0.7):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_task_vector_one_block_reproduces_the_best_alpha_of_a_fine_grid():
    start, end = _net(0), _perturbed(_net(0), 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)) * 2
    teacher = copy.deepcopy(start)
    interpolate_models(start, end, 0.6, into=teacher)
    with torch.no_grad():  # soft targets of θ(0.6) blurred a little: the loss along α has an interior minimum
        target = torch.softmax(teacher(x) / 1.5, -1)

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch[1])

    spacing = 0.005
    grid = [i * spacing for i in range(int(1 / spacing) + 1)]
    probe = copy.deepcopy(start)
    losses = []
    with torch.no_grad():
        for a in grid:  # the reference: whole-model interpolation by wise_ft, one forward per α
            interpolate_models(start, end, a, into=probe)
            losses.append(float(loss_fn(probe(x), (x, target))))
    best = grid[min(range(len(grid)), key=losses.__getitem__)]
    assert 0.05 < best < 0.95  # an interior optimum, or the test would only check the clamp

    learned = LearnedInterpolation(start, end, blocks="all", init=0.3)
    coef = learned.fit([(x, target)], objective="loss", loss_fn=loss_fn, steps=80, lr=0.05)
    assert coef.shape == (1, 1)
    assert abs(float(coef) - best) <= spacing
    # clamped below the optimum, the learned α stops at the bound (AdaMerging keeps α in [0, 1])
    capped = LearnedInterpolation(start, end, blocks="all", init=0.3)
    capped.fit([(x, target)], objective="loss", loss_fn=loss_fn, steps=20, lr=0.05, clamp=(0.0, best - 0.1))
    assert float(capped.coefficients) == pytest.approx(best - 0.1)
    # the start model was only read
    torch.testing.assert_close(_state(start), _state(_net(0)), rtol=0, atol=0)


def _hand_written_entropy_loop(start, ends, batches, init, lr, steps, optimizer):
    names = [n for n, _ in start.named_parameters()]
    s = {n: p.detach() for n, p in start.named_parameters()}
    taus = [{n: dict(e.named_parameters())[n].detach() - s[n] for n in names} for e in ends]
    coef = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([coef], lr=lr) if optimizer == "adam" else None
    for step in range(steps):
        x = batches[step % len(batches)]
        theta = {n: s[n] + sum(coef[k, i] * taus[k][n] for k in range(len(ends)))
                 for i, n in enumerate(names)}
        p = torch.softmax(functional_call(start, theta, (x,)), -1)
        h = -(p * p.log()).sum(-1).mean()
        if opt is not None:
            opt.zero_grad()
            h.backward()
            opt.step()
        else:
            (grad,) = torch.autograd.grad(h, coef)
            with torch.no_grad():
                coef -= lr * grad
    return coef.detach()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_entropy_minimisation_equals_a_hand_written_loop(optimizer):
    start = _net(0)
    ends = [_perturbed(start, 1), _perturbed(start, 2)]
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 4, generator=g) for _ in range(3)]
    init = torch.rand(2, 4, generator=g)
    learned = LearnedInterpolation(start, ends, blocks="tensor", init=init)
    got = learned.fit(batches, objective="entropy", steps=7, lr=0.05, optimizer=optimizer)
    want = _hand_written_entropy_loop(start, ends, batches, init, 0.05, 7, optimizer)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, init)
    assert len(learned.history) == 7
    assert all(p.grad is None for p in start.parameters())  # the endpoints stay frozen


def test_merged_weights_equal_the_dense_formula_and_memory_is_task_vectors_plus_coefficients():
    start = _net(0)
    ends = [_perturbed(start, 1), _perturbed(start, 2), _perturbed(start, 3)]
    learned = LearnedInterpolation(start, ends, blocks=r"^(\d+)\.")  # one block per nn.Sequential layer
    assert learned.block_names == ["0", "2"]
    coef = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    learned.coefficients = coef
    block = {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": 1}
    s, e = _state(start), [_state(m) for m in ends]
    merged = learned.merged_state_dict()
    for n in s:
        want = s[n] + sum(coef[k, block[n]] * (e[k][n] - s[n]) for k in range(3))
        torch.testing.assert_close(merged[n], want)
    n_start = sum(t.numel() for t in s.values())
    assert learned.stored_numel() == 3 * n_start + 6
    into = _net(5)
    learned.apply_to(into)
    torch.testing.assert_close(_state(into), merged, rtol=0, atol=0)


def test_coefficients_saved_and_reloaded_give_the_same_merged_weights(tmp_path):
    start = _net(0)
    ends = [_perturbed(start, 1), _perturbed(start, 2)]
    batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(5))]
    learned = LearnedInterpolation(start, ends, blocks="tensor")
    learned.fit(batches, objective="entropy", steps=3, lr=0.1)
    paths = learned.save_coefficients(tmp_path / "coef")
    assert sorted(p.name for p in paths) == ["coefficients.json", "coefficients.safetensors"]
    again = LearnedInterpolation(start, ends, blocks="tensor", init=0.0)
    again.load_coefficients(tmp_path / "coef")
    torch.testing.assert_close(again.merged_state_dict(), learned.merged_state_dict(), rtol=0, atol=0)
    other = LearnedInterpolation(start, ends, blocks="all")
    with pytest.raises(ValueError, match="other tensors or blocks"):
        other.load_coefficients(tmp_path / "coef")
    with pytest.raises(FileNotFoundError, match="coefficients"):
        other.load_coefficients(tmp_path / "nowhere")


def test_hf_model_learns_on_the_loss_and_saves_a_loadable_merged_checkpoint(tmp_path):
    from transformers import BertForSequenceClassification

    start = tiny_bert(0).eval()
    end = _perturbed(start, 1, scale=0.05)
    before = _state(start)
    g = torch.Generator().manual_seed(6)
    batch = {"input_ids": torch.randint(6, 64, (8, 6), generator=g),
             "labels": torch.randint(0, 2, (8,), generator=g)}
    learned = LearnedInterpolation(start, end, blocks="layer", init=0.5)
    learned.fit([batch], objective="loss", steps=3, lr=0.05)
    assert learned.coefficients.shape == (1, len(learned.block_names))
    assert not torch.allclose(learned.coefficients, torch.full_like(learned.coefficients, 0.5))
    out = learned.save_merged(tmp_path / "merged")
    loaded = BertForSequenceClassification.from_pretrained(out).eval()
    merged = learned.merged_state_dict()
    loaded_sd = loaded.state_dict()
    for n, t in merged.items():
        torch.testing.assert_close(loaded_sd[n], t, rtol=0, atol=0)
    torch.testing.assert_close(_state(start), before, rtol=0, atol=0)  # start swapped back bit-exactly
    # the loss objective at the learned α equals the loss of the saved model
    with torch.no_grad():
        want = loaded(**batch).loss
        got = functional_call(start, learned.merged_state_dict(), args=(), kwargs=batch).loss
    torch.testing.assert_close(got, want)


def test_causal_lm_entropy_is_the_mean_next_token_entropy_per_sequence():
    from robustft.ops.dawin import causal_lm_mask, prediction_entropy

    start = tiny_llama(0).eval()
    end = _perturbed(start, 1, scale=0.05)
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :2] = -100  # a prompt: its positions do not count
    batch = {"input_ids": ids, "labels": labels}
    learned = LearnedInterpolation(start, end, blocks="all", init=0.5)
    learned.fit([batch], objective="entropy", steps=1, lr=0.1, optimizer="sgd")
    coef = torch.full((1, 1), 0.5, requires_grad=True)
    s = {n: p.detach() for n, p in start.named_parameters()}
    e = dict(end.named_parameters())
    theta = {n: s[n] + coef[0, 0] * (e[n].detach() - s[n]) for n in s}
    logits = functional_call(start, theta, args=(), kwargs={"input_ids": ids}).logits
    h = prediction_entropy(logits, causal_lm_mask(labels)).mean()
    (grad,) = torch.autograd.grad(h, coef)
    torch.testing.assert_close(learned.coefficients, (0.5 - 0.1 * grad).detach())


def test_bad_options_are_named():
    start = _net(0)
    end = _perturbed(start, 1)
    with pytest.raises(ValueError, match="ends: no fine-tuned model"):
        LearnedInterpolation(start, [])
    wrong = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"tensor '0.weight': shape \(9, 4\)"):
        LearnedInterpolation(start, wrong)
    with pytest.raises(ValueError, match="ends\\[0\\]: has no tensor"):
        LearnedInterpolation(start, {"0.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="init must be a finite number, got 'half'"):
        LearnedInterpolation(start, end, init="half")
    with pytest.raises(ValueError, match="init must be a finite number, got nan"):
        LearnedInterpolation(start, end, init=float("nan"))
    with pytest.raises(ValueError, match="init: shape"):
        LearnedInterpolation(start, end, init=torch.zeros(2, 2))
    learned = LearnedInterpolation(start, end)
    x = [torch.randn(2, 4)]
    with pytest.raises(ValueError, match="objective must be one of 'loss', 'entropy', got 'accuracy'"):
        learned.fit(x, objective="accuracy")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        learned.fit(x, objective="entropy", lr=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        learned.fit(x, objective="entropy", steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        learned.fit(x, objective="entropy", optimizer="lbfgs")
    with pytest.raises(ValueError, match="data: no batch"):
        learned.fit([], objective="entropy")
    with pytest.raises(ValueError, match="returned no loss"):
        learned.fit(x, objective="loss")
    with pytest.raises(ValueError, match="save_pretrained"):
        learned.save_merged("unused")


def _lora(base, seed, targets):
    from peft import LoraConfig, get_peft_model

    from robustft.lora.io import adapter_from_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(base), config)
    return adapter_from_peft_model(peft), _state(peft.merge_and_unload())


def test_lora_coefficients_per_module_equal_peft_merges():
    base = tiny_bert(0).eval()
    ad1, merged1 = _lora(base, 1, ["query", "value"])
    ad2, merged2 = _lora(base, 2, ["query"])  # no value module: its τ is zero
    learned = LearnedInterpolation.from_lora(base, [ad1, ad2])
    names = list(learned.start)
    assert names and all(n.endswith(("query.weight", "value.weight")) for n in names)
    assert learned.coefficients.shape == (2, len(names))
    coef = torch.randn(2, len(names), generator=torch.Generator().manual_seed(8))
    learned.coefficients = coef
    got = learned.merged_state_dict()
    w = _state(base)
    for i, n in enumerate(names):  # θ = W + Σ_k α_k (merge_and_unload_k − W), PEFT's own merges
        want = w[n] + coef[0, i] * (merged1[n] - w[n]) + coef[1, i] * (merged2[n] - w[n])
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6)
    ids = torch.randint(6, 64, (4, 6), generator=torch.Generator().manual_seed(9))
    learned.fit([{"input_ids": ids}], objective="entropy", steps=2, lr=0.1)
    assert not torch.equal(learned.coefficients, coef)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="LoRA factor .*lora_B.*from_lora"):
        LearnedInterpolation(peft, copy.deepcopy(peft))
    with pytest.raises(ValueError, match="adapters: none"):
        LearnedInterpolation.from_lora(base, [])
    with pytest.raises(ValueError, match="not a weighted module"):
        LearnedInterpolation.from_lora(tiny_llama(0), [ad1])


def test_merge_saved_streams_the_same_weights_as_in_memory(tmp_path):
    from transformers import BertForSequenceClassification

    from robustft.interpolation.learned import merge_saved

    start = tiny_bert(0).eval()
    ends = [_perturbed(start, 1, scale=0.05), _perturbed(start, 2, scale=0.05)]
    for name, m in [("start", start), ("a", ends[0]), ("b", ends[1])]:
        m.save_pretrained(tmp_path / name)
    learned = LearnedInterpolation(start, ends, blocks="layer")
    shape = learned.coefficients.shape
    learned.coefficients = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    learned.save_coefficients(tmp_path / "coef")
    out = merge_saved(tmp_path / "start", [tmp_path / "a", tmp_path / "b"], tmp_path / "coef",
                      tmp_path / "merged", max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    loaded = BertForSequenceClassification.from_pretrained(out).state_dict()
    merged = learned.merged_state_dict()
    for n, t in loaded.items():
        torch.testing.assert_close(t, merged.get(n, _state(start)[n]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ends: 1 checkpoints for 2 task vectors"):
        merge_saved(tmp_path / "start", [tmp_path / "a"], tmp_path / "coef", tmp_path / "other")
    tiny_llama(0).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="fitted on another model"):
        merge_saved(tmp_path / "llama", [tmp_path / "llama"] * 2, tmp_path / "coef", tmp_path / "other")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("bad", ["0.5", True, float("inf"), None, [0.5]])
def test_init_follows_the_one_numeric_rule(bad):
    """checks.check_number: a numeric string or a bool is not a coefficient (float() would take both)."""
    start = _net(0)
    with pytest.raises(ValueError, match=r"init must be a finite number, got "):
        LearnedInterpolation(start, _perturbed(start, 1), init=bad)
    with pytest.raises(ValueError, match="init: the tensor holds non-finite values"):
        LearnedInterpolation(start, _perturbed(start, 1), blocks="all", init=torch.tensor([[float("nan")]]))


@pytest.mark.parametrize("scalar", [np.float32(0.25), torch.tensor(0.25), 0.25, fractions.Fraction(1, 4)])
def test_init_accepts_real_scalars(scalar):
    """numpy and 0-d torch scalars are real numbers: the same coefficients as the Python float."""
    start = _net(0)
    got = LearnedInterpolation(start, _perturbed(start, 1), init=scalar).coefficients
    assert torch.equal(got, torch.full_like(got, 0.25))


def test_from_lora_refuses_a_target_parameters_adapter_by_name():
    from robustft.lora.algebra import DeltaSet, LoRADelta
    from robustft.lora.io import LoRAAdapter

    name = "model.layers.0.mlp.experts[0]"
    adapter = LoRAAdapter(DeltaSet({name: LoRADelta(torch.ones(4, 1), torch.ones(1, 3), 1.0, name)}), {},
                          {name: "parameter"})
    with pytest.raises(ValueError, match=r"experts\[0\]'.*target_parameters"):
        LearnedInterpolation.from_lora(nn.Linear(3, 4), [adapter])
