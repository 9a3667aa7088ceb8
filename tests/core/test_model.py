"""core/model.py: one batch on given weights, the shared optimisation loop and the causal-LM test, each
against a brute-force reference (the module run with its weights copied in, plain gradient descent)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robustft.core.model import call_with_weights, cycle_batches, is_causal_lm, minimise


class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, scale=None):
        out = self.lin(x)
        return out if scale is None else out * scale


def _weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _copied(model, weights):
    twin = copy.deepcopy(model)
    twin.load_state_dict(weights)
    return twin


def test_call_with_weights_is_the_model_with_those_weights_loaded():
    model = TwoArgs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = _weights(model, 1)
    x = torch.randn(4, 3)
    twin = _copied(model, weights)
    torch.testing.assert_close(call_with_weights(model, weights, x), twin(x))
    torch.testing.assert_close(call_with_weights(model, weights, (x, torch.zeros(4))), twin(x))
    torch.testing.assert_close(call_with_weights(model, weights, [x]), twin(x))
    torch.testing.assert_close(call_with_weights(model, weights, {"x": x, "scale": 3.0}), twin(x, scale=3.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched


def test_cycle_batches_repeats_the_data_and_refuses_empty_data():
    batches = cycle_batches([1, 2, 3])
    assert [next(batches) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="data: no batch"):
        next(cycle_batches([]))


def test_is_causal_lm_knows_causal_lms_by_class_and_transformers_mapping():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tiny = dict(vocab_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert is_causal_lm(LlamaForCausalLM(LlamaConfig(hidden_size=8, num_key_value_heads=2, **tiny)))
    assert is_causal_lm(GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16)))
    assert not is_causal_lm(BertModel(BertConfig(hidden_size=8, **tiny)))
    assert not is_causal_lm(nn.Linear(2, 2))
    wrapper = nn.Sequential(LlamaForCausalLM(LlamaConfig(hidden_size=8, num_key_value_heads=2, **tiny)))
    assert is_causal_lm(wrapper)  # found among the submodules


def _quadratic_setup():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, generator=g)
    data = [(torch.randn(5, generator=g),) for _ in range(3)]

    def loss_fn(outputs, batch):
        return ((outputs - target * batch[0]) ** 2).sum()

    return target, data, loss_fn


@pytest.mark.parametrize("clamp", [None, (-0.3, 0.4)])
def test_minimise_with_sgd_is_plain_projected_gradient_descent(clamp):
    target, data, loss_fn = _quadratic_setup()
    w = torch.zeros(5, requires_grad=True)
    history = minimise([w], lambda batch: w * batch[0], data, "loss", 7, 0.1, "sgd", loss_fn, clamp, False)

    ref, expected = torch.zeros(5), []
    for step in range(7):  # brute force: the gradient of sum((w x - t x)^2) is 2 x^2 (w - t)
        x = data[step % len(data)][0]
        expected.append(float(((ref * x - target * x) ** 2).sum()))
        ref = ref - 0.1 * 2 * x ** 2 * (ref - target)
        if clamp is not None:
            ref = ref.clamp(*clamp)
    torch.testing.assert_close(w.detach(), ref)
    assert history == pytest.approx(expected, rel=1e-5)


def test_minimise_default_loss_is_the_outputs_loss_and_entropy_is_the_softmax_entropy():
    logits = torch.zeros(4, 3, requires_grad=True)
    def forward(batch):
        return SimpleNamespace(logits=logits * batch)

    history = minimise([logits], forward, [torch.ones(1)], "entropy", 1, 0.1, "adam", None, None, False)
    assert history == pytest.approx([float(torch.log(torch.tensor(3.0)))])  # uniform over 3 classes
    w = torch.ones(2, requires_grad=True)
    history = minimise([w], lambda batch: {"loss": (w * batch).sum()}, [torch.full((2,), 2.0)], "loss",
                       2, 0.5, "sgd", None, None, False)
    assert history == [4.0, 0.0]  # 2 (1 + 1), then w = 1 - 0.5 * 2 = 0


@pytest.mark.parametrize("change, match", [
    (dict(objective="kl"), "objective"), (dict(optimizer="lbfgs"), "optimizer"), (dict(steps=0), "steps"),
    (dict(lr=0.0), "lr"), (dict(clamp=(1.0,)), "clamp"), (dict(clamp=(1.0, 0.0)), r"clamp\[1\]"),
])
def test_minimise_refuses_bad_options_before_a_step(change, match):
    w = torch.zeros(2, requires_grad=True)
    options = dict(objective="loss", steps=1, lr=0.1, optimizer="sgd", clamp=None)
    options.update(change)
    with pytest.raises(ValueError, match=match):
        minimise([w], lambda b: {"loss": (w - 1).pow(2).sum()}, [None], options["objective"],
                 options["steps"], options["lr"], options["optimizer"], None, options["clamp"], False)
    assert torch.equal(w, torch.zeros(2))


def test_minimise_stops_on_a_non_finite_objective():
    w = torch.zeros(1, requires_grad=True)
    with pytest.raises(FloatingPointError, match="step 0"):
        minimise([w], lambda b: {"loss": (w + float("nan")).sum()}, [None], "loss", 3, 0.1, "sgd", None, None,
                 False)
