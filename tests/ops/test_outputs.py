"""The loss of a model's output, read one way (``robustft.ops.outputs.model_loss``) by the Fisher estimate,
the learned coefficients and the sharpness diagnostics: a dict, a ModelOutput or a ``.loss`` attribute."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from robustft.analysis.sharpness import layer_sharpness, module_criticality
from robustft.core.statistics import estimate_fisher
from robustft.ops.outputs import model_loss


class Classifier(nn.Module):
    """An MLP classifier called as ``model(x=..., labels=...)``; ``kind``: where its output has the loss."""

    def __init__(self, kind: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        self.kind = kind

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        if self.kind == "dict":
            return {"logits": logits} if loss is None else {"loss": loss, "logits": logits}
        if self.kind == "model_output":
            return SequenceClassifierOutput(loss=loss, logits=logits)
        return SimpleNamespace(loss=loss, logits=logits)


def _batch(seed: int = 0, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return {"x": x, "labels": (x[:, 0] > 0).long()}


def _ce(outputs, batch):  # the reference: the loss computed from the logits, not read from the output
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    return nn.functional.cross_entropy(logits, batch["labels"])


def test_model_loss_reads_a_mapping_a_model_output_and_an_attribute():
    loss = torch.tensor(0.25)
    for outputs in ({"loss": loss}, SequenceClassifierOutput(loss=loss), SimpleNamespace(loss=loss)):
        assert model_loss(outputs) is loss
    for outputs in ({"logits": loss}, SequenceClassifierOutput(logits=loss), torch.zeros(2), (loss,)):
        with pytest.raises(ValueError, match="the model returned no loss"):
            model_loss(outputs)


@pytest.mark.parametrize("kind", ["dict", "model_output", "attribute"])
def test_module_criticality_reads_the_loss_the_model_returns(kind):
    """No loss_fn needed whatever holds the loss: the same MRC as with the loss computed by hand."""
    model, batch = Classifier(kind), _batch()
    got = module_criticality(model, batch, epsilon=0.2, steps=3)
    want = module_criticality(copy.deepcopy(model), batch, epsilon=0.2, steps=3, loss_fn=_ce)
    assert got.keys() == want.keys() == {"net.0", "net.2"}
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert layer_sharpness(model, batch, rho=0.1, steps=2) == pytest.approx(
        layer_sharpness(model, batch, rho=0.1, steps=2, loss_fn=_ce), rel=1e-12, abs=0)


@pytest.mark.parametrize("kind", ["dict", "model_output", "attribute"])
def test_estimate_fisher_reads_the_same_outputs(kind):
    model, batch = Classifier(kind), _batch(n=4)
    fisher = estimate_fisher(model, [batch])
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):  # per example: the squared gradient of its loss, averaged
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        _ce(model(**one), one).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad.detach() ** 2 / 4
    for n, f in fisher.items():
        torch.testing.assert_close(f, ref[n], rtol=1e-5, atol=1e-8)


def test_a_model_without_a_loss_is_a_named_error_everywhere():
    model, batch = Classifier("dict"), _batch()
    del batch["labels"]
    with pytest.raises(ValueError, match="the model returned no loss"):
        module_criticality(model, batch)
    with pytest.raises(ValueError, match="estimate_fisher: the model returned no loss"):
        estimate_fisher(model, [batch])


def test_model_logits_reads_mappings_attributes_tuples_and_tensors():
    """The logits of every output form a model returns: the ``"logits"`` entry of a mapping (a plain dict
    included), the attribute, the first element of a tuple, or the tensor itself."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    from robustft.ops.outputs import model_logits

    x = torch.randn(2, 3)
    assert model_logits({"logits": x}) is x
    assert model_logits(SequenceClassifierOutput(logits=x)) is x
    assert model_logits((x, torch.zeros(1))) is x
    assert model_logits(x) is x
    with pytest.raises(ValueError, match="no logits"):
        model_logits({"loss": x.sum()})


def test_sequence_losses_equal_the_models_own_loss_one_sequence_at_a_time():
    """Reference: transformers' causal-LM loss of each row alone (its labels shifted inside the model)."""
    from robustft.ops.outputs import sequence_losses
    from tests.tiny import tiny_llama

    model = tiny_llama().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (4, 9), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[2, :3] = -100
    labels[3, 7:] = -100  # padding at the end
    with torch.no_grad():
        got = sequence_losses(model(input_ids=ids).logits, labels)
        want = [model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss for i in range(4)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, got.mean())  # the rows differ: a per-row score, not the batch mean
    with pytest.raises(ValueError, match="sequence_losses"):
        sequence_losses(torch.zeros(2, 3), labels)
