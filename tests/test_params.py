"""params.py: selection by name, snapshots on device/dtype, swaps that always restore."""

import pytest
import torch
from torch import nn

from robustft.params import Snapshot, select_parameters, swapped_in


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
