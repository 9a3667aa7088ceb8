"""params.py: selection by name, snapshots on device/dtype, swaps that always restore."""

import pytest
import torch
from torch import nn

from robustft.core.params import Snapshot, restored, select_parameters, swapped_in, train_mode


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.encoder.weight.requires_grad_(False)


def test_selection_defaults_patterns_and_buffers():
    net = Net()
    names = list(select_parameters(net))
    assert "encoder.weight" not in names and "encoder.bias" in names and "head.weight" in names
    assert list(select_parameters(net, include=r"^head\.")) == ["head.weight", "head.bias"]
    assert "head.bias" not in select_parameters(net, exclude=r"bias$")
    assert "encoder.weight" in select_parameters(net, trainable_only=False)
    with_buffers = select_parameters(net, buffers=True)
    assert "bn.running_mean" in with_buffers and "bn.num_batches_tracked" not in with_buffers
    flat = select_parameters(net, skip_norm_and_bias=True)
    assert list(flat) == ["bn.weight", "head.weight"]  # BatchNorm weight is a scale, kept


def test_selection_errors_name_the_option():
    net = Net()
    with pytest.raises(ValueError, match="include: pattern 'decoder' matches no"):
        select_parameters(net, include=["head", "decoder"])
    with pytest.raises(ValueError, match="include: .* not a valid regular expression"):
        select_parameters(net, include="(")
    with pytest.raises(ValueError, match="no parameter selected"):
        select_parameters(net, exclude=".")


def test_snapshot_device_dtype_and_roundtrip():
    net = Net().to(torch.bfloat16)
    params = select_parameters(net)
    snap = Snapshot.of(params, device="cpu", dtype="auto")
    assert all(t.dtype == torch.float32 for t in snap.tensors)
    assert Snapshot.of(params, dtype=None).tensors[0].dtype == torch.bfloat16
    before = [p.detach().clone() for p in params.values()]
    with torch.no_grad():
        for p in params.values():
            p.add_(1)
    snap.copy_to(params)
    for b, p in zip(before, params.values()):
        assert torch.equal(b, p.detach())
    with pytest.raises(ValueError, match="not a torch dtype"):
        Snapshot.of(params, dtype="float33")


def test_snapshot_load_state_dict_names_the_tensor():
    params = select_parameters(Net())
    snap = Snapshot.of(params)
    state = snap.state_dict()
    state.pop("head.bias")
    with pytest.raises(ValueError, match="'head.bias' missing in ckpt"):
        snap.load_state_dict(state, source="ckpt")
    state = snap.state_dict()
    state["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="'head.weight' .* shape"):
        snap.load_state_dict(state)


@pytest.mark.parametrize("dtype", [None, "float64"])
def test_swapped_in_restores_bit_exactly_even_on_error(dtype):
    net = Net()
    params = select_parameters(net)
    live = [p.detach().clone() for p in params.values()]
    other = Snapshot.of(params, dtype=dtype)
    for t in other.tensors:
        t.normal_()
    expected_other = [t.clone() for t in other.tensors]
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_in(params, other):
            for p, o in zip(params.values(), expected_other):
                torch.testing.assert_close(p.detach(), o.to(p.dtype))
            raise RuntimeError("boom")
    for p, l in zip(params.values(), live):
        assert torch.equal(p.detach(), l)
    for t, e in zip(other.tensors, expected_other):  # the snapshot itself is unchanged too
        assert torch.equal(t, e)


@pytest.mark.parametrize("kind", ["snapshot", "tensors"])
def test_swapped_in_snapshot_is_only_read_and_the_block_keeps_the_grad_mode(kind):
    """An in-place edit of the model inside the block never reaches what was swapped in (before: the live and
    the snapshot values were exchanged, so the edit came back in the snapshot); grad mode is the caller's."""
    net = Net()
    params = select_parameters(net)
    live = [p.detach().clone() for p in params.values()]
    other = Snapshot.of(params)
    for t in other.tensors:
        t.normal_()
    want = [t.clone() for t in other.tensors]
    swapped = other if kind == "snapshot" else other.tensors
    with swapped_in(params, swapped):
        assert torch.is_grad_enabled()
        assert all(torch.equal(t, w) for t, w in zip(other.tensors, want))  # still what was swapped in
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        assert all(torch.equal(t, w) for t, w in zip(other.tensors, want))
    for t, w in zip(other.tensors, want):
        assert torch.equal(t, w)
    for p, l in zip(params.values(), live):
        assert torch.equal(p.detach(), l)
    with torch.no_grad(), swapped_in(params, other):
        assert not torch.is_grad_enabled()


def test_restored_puts_the_values_back_from_the_copy_it_yields():
    net = Net()
    params = select_parameters(net)
    live = [p.detach().clone() for p in params.values()]
    with pytest.raises(RuntimeError, match="boom"):
        with restored(params) as saved:
            assert all(torch.equal(s, l) for s, l in zip(saved.tensors, live))
            with torch.no_grad():
                for p in params.values():
                    p.mul_(3.0)
            raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), l) for p, l in zip(params.values(), live))
    given = Snapshot.of(params)
    with restored(params, given) as saved:
        assert saved is given
    with pytest.raises(ValueError, match="disagree"):
        with restored(params, Snapshot.of({"x": torch.zeros(2)})):
            pass


def test_evaluate_at_alphas_edits_inside_run_reach_neither_later_alphas_nor_the_end_weights():
    """The WiSE-FT sweep context: θ(α) is written per α from the kept end values, whatever ``run`` does."""
    from robustft.interpolation.wise_ft import WiseFTWeights, evaluate_at_alphas

    start, end = Net(), Net()
    with torch.no_grad():
        for p in end.parameters():
            p.add_(torch.randn_like(p))
    weights = WiseFTWeights.from_models(start, end)
    params = dict(end.named_parameters())
    want_end = {n: p.detach().clone() for n, p in params.items()}
    seen = []

    def run(i):
        seen.append({n: p.detach().clone() for n, p in params.items()})
        with torch.no_grad():
            for p in params.values():
                p.add_(100.0)
        return torch.is_grad_enabled()

    assert evaluate_at_alphas(weights, [0.5, 0.5], run) == [True, True]
    for n in want_end:
        assert torch.equal(seen[0][n], seen[1][n]), n
        assert torch.equal(params[n].detach(), want_end[n]), n


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def test_train_mode_sets_every_module_and_gives_each_its_own_mode_back():
    net = Net().train()
    net.norm.eval()  # a submodule the user put in eval()
    want = _modes(net)
    for training in (False, True):
        with pytest.raises(RuntimeError, match="boom"):
            with train_mode(net, training) as same:
                assert same is net
                assert all(mode == training for mode in _modes(net).values())  # as net.train(training)
                raise RuntimeError("boom")
        assert _modes(net) == want


def test_fisher_gram_and_batchnorm_passes_leave_each_modules_mode():
    """estimate_fisher / estimate_gram (eval), recompute_batchnorm (train): a submodule in eval() stays so."""
    from robustft.callbacks.averaging import recompute_batchnorm
    from robustft.core.statistics import estimate_fisher, estimate_gram
    from tests.tiny import tiny_bert

    model = tiny_bert().train()
    model.bert.encoder.layer[0].eval()
    want = _modes(model)
    batch = {"input_ids": torch.randint(6, 64, (2, 8)), "labels": torch.tensor([0, 1])}
    estimate_fisher(model, [batch])
    assert _modes(model) == want
    estimate_gram(model, [batch])
    assert _modes(model) == want
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    net[2].eval()
    want = _modes(net)
    recompute_batchnorm(net, [torch.randn(4, 4)])
    assert _modes(net) == want


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weights_are_named_and_dequantized_to_what_the_layer_computes_with(bits):
    """``dequantized_weight`` is the W of the layer's own training forward x @ Wᵀ (bitsandbytes on CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from robustft.core.params import dequantized_weight, quantization

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    if bits == 4:
        layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    layer = layer.to("cpu").train()
    assert quantization(layer.weight) == ("bitsandbytes 4-bit (nf4)" if bits == 4 else "bitsandbytes 8-bit")
    assert quantization(dense.weight) is None and quantization(torch.zeros(2, dtype=torch.int8)) == "int8"
    w = dequantized_weight(layer)
    assert w.dtype == torch.float32 and w.shape == dense.weight.shape
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-6)
    assert 0 < (w - dense.weight).abs().max() < 0.1  # quantized, close to the original
    with pytest.raises(ValueError, match="not a bitsandbytes"):
        dequantized_weight(dense)


def test_keep_4bit_trainable_keeps_the_backward_of_a_4bit_layer_evaluated_on_cpu():
    """After ``keep_4bit_trainable`` an eval-mode forward without gradients leaves the 4-bit layer's CPU
    layout as it was, so its backward still reaches the input (x.grad = g @ W, W the dequantized weight);
    a layer bitsandbytes already repacked for CPU inference is refused by name."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    from robustft.core.params import dequantized_weight, keep_4bit_trainable

    def layer():
        torch.manual_seed(0)
        lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
        lin.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on an AVX512-BF16 CPU
        return nn.Sequential(lin.to("cpu"))

    model = layer()
    assert keep_4bit_trainable(model) == 1 and keep_4bit_trainable(model) == 0
    w = dequantized_weight(model[0])
    with torch.no_grad():
        model.eval()(torch.randn(3, 64))
    x = torch.randn(3, 64, requires_grad=True)
    model.train()(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ w, rtol=1e-5, atol=1e-5)
    if not has_avx512bf16():
        return  # bitsandbytes repacks only on CPUs with AVX512-BF16
    repacked = layer()
    with torch.no_grad():
        repacked.eval()(torch.randn(3, 64))
    with pytest.raises(ValueError, match=r"^0: its 4-bit weight is in bitsandbytes' CPU inference layout"):
        keep_4bit_trainable(repacked)
