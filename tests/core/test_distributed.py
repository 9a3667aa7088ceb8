"""core/distributed.py's single-process paths: without torch.distributed (and in a one-rank gloo group) every
collective is the identity, and without DeepSpeed nothing is detected. The multi-rank paths are run by the
launch tests in tests/distributed/."""

import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from robustft.core import distributed as rd


def _check_identity_collectives():
    value = torch.tensor([1.5, -2.0])
    for collective in (rd.all_reduce_sum, rd.all_reduce_mean, rd.broadcast_from_main):
        out = collective(value)
        assert out is value and torch.equal(value, torch.tensor([1.5, -2.0])), collective.__name__
    assert (rd.rank(), rd.world_size(), rd.is_main_process()) == (0, 1, True)
    rd.barrier()


def test_without_a_process_group_collectives_are_the_identity():
    assert not dist.is_initialized()
    _check_identity_collectives()


def test_in_a_one_rank_group_collectives_are_the_identity(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _check_identity_collectives()
    finally:
        dist.destroy_process_group()


def test_full_state_dict_of_a_plain_model_is_its_state_dict():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    full = rd.full_state_dict(model)
    expected = model.state_dict()
    assert full.keys() == expected.keys()
    assert all(torch.equal(full[k], expected[k]) and full[k].device.type == "cpu" for k in expected)


def test_plain_models_need_no_gather_or_reshard(monkeypatch):
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rd.reshard(None)
    rd.reshard(model)
    with rd.gathered(model.parameters()):
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_deepspeed_imported_nothing_is_deepspeed(monkeypatch):
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    model = nn.Linear(2, 2)
    for obj in (model, dict(model.named_parameters()), list(model.parameters()), object()):
        assert rd.deepspeed_stage(obj) is None
        assert rd.deepspeed_engine(obj) is None


@pytest.mark.parametrize("keys", [("momentum_buffer",), ("exp_avg", "momentum_buffer")])
def test_optimizer_states_before_the_first_step_are_none(keys):
    class Engine:  # DeepSpeed's layout: engine.optimizer (ZeRO wrapper).optimizer (torch) .state
        pass

    params = list(nn.Linear(2, 2).parameters())
    engine = Engine()
    engine.optimizer = Engine()
    engine.optimizer.optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert rd.deepspeed_optimizer_states(engine, params, keys) == [None, None]
