"""Sparse updates, LP-FT, shrink-perturb, DaWin and the EMA reference under 2-rank DDP (CPU, gloo).

Each case runs once on one process and once on 2 DDP ranks with the same global batch
(tests/distributed/callbacks_run.py); the ranks must agree bit for bit, and both must equal the one-process
run within float tolerance (the gradient is averaged over the ranks' halves instead of one batch).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.distributed.harness import torchrun

CASES = ["plain", "sparse_fisher", "sparse_magnitude", "lpft", "shrink", "dawin", "ema_reference"]
STEPS = 4
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("callbacks_ddp")
    for mode, nproc in (("single", 1), ("ddp", 2)):
        torchrun("tests/distributed/callbacks_run.py", str(root / mode), nproc=nproc, timeout=600)
    return root


def _load(root, mode, case, rank=0) -> dict[str, dict[str, torch.Tensor]]:
    """The run's tensors grouped by kind: start, end, step<k>, mask, ref -> name -> tensor."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(root / mode / case / f"rank{rank}.safetensors")).items():
        kind, name = key.split(".", 1)
        groups.setdefault(kind, {})[name] = t
    return groups


def _meta(root, mode, case, rank=0) -> dict[str, str]:
    with safe_open(str(root / mode / case / f"rank{rank}.safetensors"), "pt") as f:
        return f.metadata()


def _ranks_agree_and_equal_single(runs, case, kinds=("end",)):
    single, ddp0, ddp1 = (_load(runs, m, case, r) for m, r in (("single", 0), ("ddp", 0), ("ddp", 1)))
    for kind in kinds:
        assert ddp0[kind].keys() == single[kind].keys(), kind
        for name, want in single[kind].items():
            assert torch.equal(ddp0[kind][name], ddp1[kind][name]), f"{kind}.{name}: ranks differ"
            torch.testing.assert_close(ddp0[kind][name], want, **TOL, msg=f"{kind}.{name}")
    return single, ddp0, ddp1


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_the_mode_that_ran(runs, case):
    """The 2-process launch really trained under DDP on 2 ranks; the reference launch on one process."""
    assert _meta(runs, "single", case)["world_size"] == "1"
    for rank in (0, 1):
        meta = _meta(runs, "ddp", case, rank)
        assert (meta["wrapper"], meta["world_size"]) == ("DistributedDataParallel", "2"), meta


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sparse_fisher", "sparse_magnitude"])
def test_sparse_update(runs, case):
    """One mask on every rank, the one-process mask; masked entries the same as at the start at each step."""
    single, ddp0, ddp1 = _ranks_agree_and_equal_single(runs, case, kinds=("mask", "end"))
    for name, mask in single["mask"].items():
        assert torch.equal(ddp0["mask"][name], mask), f"{name}: the DDP mask is not the one-process mask"
    for run in (single, ddp0, ddp1):
        for name, mask in run["mask"].items():
            for step in range(1, STEPS + 1):
                now, start = run[f"step{step}"][name], run["start"][name]
                assert torch.equal(now[~mask], start[~mask]), f"{name} moved where masked at step {step}"
        assert any(not torch.equal(run["end"][n][m], run["start"][n][m]) for n, m in run["mask"].items())


@pytest.mark.slow
def test_lpft_boundary_and_frozen_backbone(runs):
    single, ddp0, ddp1 = _ranks_agree_and_equal_single(runs, "lpft", kinds=("end", "step1", "step2", "step3"))
    for rank in (0, 1):
        assert json.loads(_meta(runs, "ddp", "lpft", rank)["facts"]) == {"boundary_step": 2}
    assert json.loads(_meta(runs, "single", "lpft")["facts"]) == {"boundary_step": 2}
    for run in (single, ddp0, ddp1):
        backbone = [n for n in run["start"] if not n.startswith("lm_head.")]
        for step in (1, 2):  # the probe: the backbone is bit-identical, the head trains
            assert all(torch.equal(run[f"step{step}"][n], run["start"][n]) for n in backbone), step
            assert not torch.equal(run[f"step{step}"]["lm_head.weight"], run["start"]["lm_head.weight"])
        assert all(not torch.equal(run["step3"][n], run["step2"][n]) for n in backbone)


@pytest.mark.slow
def test_shrink_perturb_same_noise_on_every_rank(runs):
    """The event after step 2 leaves the ranks bit-equal (same noise), and equal to one process."""
    single, ddp0, _ = _ranks_agree_and_equal_single(runs, "shrink", kinds=("step2", "step4", "end"))
    plain = _load(runs, "single", "plain")
    for name, w in single["step2"].items():  # the event happened: λ·θ + σ·ε is far from a plain step 2
        assert not torch.allclose(w, plain["step2"][name], atol=1e-3), name


@pytest.mark.slow
def test_dawin_equals_one_process(runs):
    """Entropies, mixture, component α's and the metric over the whole eval sets, as on one process."""
    _ranks_agree_and_equal_single(runs, "dawin")
    single = json.loads(_meta(runs, "single", "dawin")["facts"])["dawin"]
    ddp = [json.loads(_meta(runs, "ddp", "dawin", r)["facts"])["dawin"] for r in (0, 1)]
    assert ddp[0] == ddp[1]
    assert ddp[0]["counts"] == single["counts"] and sum(single["counts"]["id"]) == 13
    for key in ("results", "alphas", "mean_lambda"):
        for name, want in single[key].items():
            assert ddp[0][key][name] == pytest.approx(want, rel=1e-5, abs=1e-6), (key, name)
    # the Trainer's eval loss averages in padding samples on 2 ranks: left out there, exact on one process
    assert ddp[0]["loss"] == {} and single["loss"]["id"] == pytest.approx(single["results"]["id"], rel=1e-6)


@pytest.mark.slow
def test_dawin_by_loss_is_refused_under_ddp_at_train_begin(runs):
    single = json.loads(_meta(runs, "single", "dawin")["facts"])["by_loss"]
    assert set(single) == {"id", "shifted"}  # one process: DaWin by loss runs
    for rank in (0, 1):
        refused = json.loads(_meta(runs, "ddp", "dawin", rank)["facts"])["by_loss"]
        assert "metric='loss' is refused on 2 ranks" in refused["refused"] and refused["global_step"] == 0


@pytest.mark.slow
def test_ema_reference_with_dpo(runs):
    """TRL's reference holds the EMA of the policy: equal on both ranks and to the one-process EMA."""
    single, ddp0, _ = _ranks_agree_and_equal_single(runs, "ema_reference", kinds=("end", "ref"))
    decay = 0.6
    for run in (single, ddp0):  # brute force: ref_t = β·ref_{t-1} + (1-β)·θ_t from the recorded steps
        for name, ref in run["ref"].items():
            want = run["start"][name].double()
            for step in range(1, STEPS + 1):
                want = decay * want + (1 - decay) * run[f"step{step}"][name].double()
            torch.testing.assert_close(ref.double(), want, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "zero3"])
def test_ema_reference_refused_on_sharded_policies_at_train_begin(tmp_path, sharding):
    """Under FSDP2 (DTensor shards) and DeepSpeed ZeRO-3 (every parameter partitioned) the EMA reference is
    refused before any step."""
    env = {"DS_ACCELERATOR": "cpu"} if sharding == "zero3" else None
    torchrun("tests/distributed/callbacks_run.py", str(tmp_path), f"ema_reference_{sharding}", timeout=400,
             env=env)
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"ema_reference_{sharding}" / f"rank{rank}.json").read_text())
        if sharding == "fsdp":
            assert facts["dtensors"], facts
        else:
            assert facts["wrapper"] == "DeepSpeedEngine" and facts["zero3_partitioned"], facts
        assert facts["global_step"] == 0, facts
        assert "supports one process or DDP; FSDP and DeepSpeed" in facts["refused"], facts
