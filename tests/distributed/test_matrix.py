"""Every callback under 1 rank, 2-rank DDP and 2-rank FSDP2 (CPU, gloo), launched for real with torchrun.

One launch per mode runs every case of tests/distributed/matrix_run.py with the same global batch. Checked:
the mode that ran (DTensor shards for FSDP2), ranks agree, DDP equals the single process, FSDP2 equals DDP
while each rank holds only its shard of the callback's state, resume, the gathered saved average, and the
LoRA composite against the dense formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.harness import torchrun

MODES = {"single": 1, "ddp": 2, "fsdp": 2}
DETERMINISTIC = ["ema", "swa", "lawa", "momentum", "wise_fixed", "wise_slerp", "wise_lora", "wise_sweep",
                 "sam", "asam", "sam_ga2", "msam", "lora_arithmetic"]  # fmt: skip
RANDOM = ["rwp", "flat_lora"]  # noise drawn per shard under FSDP2: same law, other draws
RESUMED = ["ema", "wise_fixed"]  # <case>_resume: stopped after the checkpoint at step 2, resumed
CASES = DETERMINISTIC + RANDOM + [f"{c}_resume" for c in RESUMED]
# refused under FSDP2 by name (per-layer directions need whole weights): 1 rank and DDP, resumed too
UNSHARDED = ["mgpo"]
UNSHARDED_CASES = UNSHARDED + [f"{c}_resume" for c in UNSHARDED]
AVERAGES = {"ema": "ema", "swa": "swa", "lawa": "lawa", "momentum": "momentum"}


def _other_adapter(path: Path) -> None:
    """A saved adapter with a non-zero delta, composed with the trained one in the lora_arithmetic case."""
    from tests.distributed.matrix_run import lora_llama

    model = lora_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    model.save_pretrained(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    for mode, nproc in MODES.items():
        _other_adapter(root / mode / "other")
        cases = CASES + (["swa_bn"] if mode == "ddp" else [])  # a plain MLP: no FSDP2 wrap policy for it
        cases += [f"{c}_refused" for c in UNSHARDED] if mode == "fsdp" else UNSHARDED_CASES
        torchrun("tests/distributed/matrix_run.py", mode, str(root / mode), *cases, nproc=nproc, timeout=400)
    return {mode: root / mode for mode in MODES}


def _load(run: Path, case: str, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(run / case / f"rank{rank}.safetensors")), json.loads(
        (run / case / f"rank{rank}.json").read_text()
    )


def _comparable(metrics: dict) -> dict[str, float]:
    """Metrics that must not depend on the mode (per-rank diagnostics and timings left out)."""
    keep = ("perturbation_norm", "sharpness", "distance", "_loss", "chosen_alpha", "wise_ft_alpha")
    return {k: v for k, v in metrics.items() if any(t in k for t in keep) and "per_second" not in k}


def _assert_same(a: tuple, b: tuple, atol: float = 2e-6, rtol: float = 1e-5) -> None:
    (ta, ia), (tb, ib) = a, b
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=rtol, msg=key)
    ma, mb = _comparable(ia["metrics"]), _comparable(ib["metrics"])
    assert ma.keys() == mb.keys()
    for key in ma:
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-7), key


@pytest.mark.slow
def test_the_mode_that_ran(runs):
    for case in CASES:
        single, ddp = _load(runs["single"], case)[1], _load(runs["ddp"], case)[1]
        fsdp = [_load(runs["fsdp"], case, r)[1] for r in (0, 1)]
        assert single["world_size"] == 1 and ddp["world_size"] == 2 and not ddp["dtensor"], case
        assert all(i["world_size"] == 2 and i["dtensor"] and i["fsdp_enabled"] for i in fsdp), case
        # each rank holds about half of every parameter, and the halves add up to the whole
        assert sum(i["local_param_numel"] for i in fsdp) == fsdp[0]["full_param_numel"], case
        assert all(i["local_param_numel"] < i["full_param_numel"] for i in fsdp), case


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_agree(runs, mode):
    for case in CASES + (UNSHARDED_CASES if mode == "ddp" else []):
        _assert_same(_load(runs[mode], case, 0), _load(runs[mode], case, 1), atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", DETERMINISTIC + RANDOM + UNSHARDED)
def test_ddp_equals_one_process(runs, case):
    """Same global batch: 2 ranks x 4 = 1 rank x 8 samples per step (replicas draw the same noise)."""
    _assert_same(_load(runs["ddp"], case), _load(runs["single"], case))


@pytest.mark.slow
@pytest.mark.parametrize("case", DETERMINISTIC)
def test_fsdp2_equals_ddp_with_sharded_state(runs, case):
    _assert_same(_load(runs["fsdp"], case), _load(runs["ddp"], case))
    ddp = _load(runs["ddp"], case)[1]["local_state_numel"]
    shards = [_load(runs["fsdp"], case, r)[1]["local_state_numel"] for r in (0, 1)]
    assert sum(shards) == ddp and (ddp == 0 or max(shards) < ddp), (shards, ddp)


@pytest.mark.slow
@pytest.mark.parametrize("case", RANDOM)
def test_fsdp2_random_perturbation_has_the_same_law(runs, case):
    """Each shard draws its own noise, so weights differ from DDP; the norm ‖ε‖ (reduced over ranks) follows
    the same law: the per-step mean of ~σ·‖W‖ agrees within the spread of a few hundred draws."""
    (tf, fi), (td, di) = _load(runs["fsdp"], case), _load(runs["ddp"], case)
    key = next(k for k in di["metrics"] if k.endswith("perturbation_norm"))
    assert fi["metrics"][key] == pytest.approx(di["metrics"][key], rel=0.2)
    assert fi["metrics"][key] != di["metrics"][key]  # really other draws
    for name in td:  # a perturbation of size ρ·‖W‖ moves the trained weights only a little
        assert torch.isfinite(tf[name]).all()
        torch.testing.assert_close(tf[name], td[name], atol=0.1, rtol=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("mode, case", [(m, c) for c in RESUMED for m in MODES]
                         + [(m, c) for c in UNSHARDED for m in ("single", "ddp")])
def test_resume_equals_uninterrupted(runs, mode, case):
    _assert_same(_load(runs[mode], f"{case}_resume"), _load(runs[mode], case), atol=1e-7, rtol=1e-6)
    state = runs[mode] / f"{case}_resume" / "checkpoint-2" / "robustft"
    files = sorted(p.name for p in state.glob("*.safetensors"))
    name = json.loads(next(state.glob("*.json")).read_text())["callback"]
    assert name in {"EMACallback", "WiseFTCallback", "MGPOCallback"}
    stem = files[0].split(".")[0]
    per_rank = [f"{stem}.rank0.safetensors", f"{stem}.rank1.safetensors"]
    assert files == (per_rank if mode == "fsdp" else [f"{stem}.safetensors"])  # FSDP2: each rank its shard


@pytest.mark.slow
@pytest.mark.parametrize("case", UNSHARDED)
def test_unsharded_cases_refuse_fsdp2_at_train_begin(runs, case):
    """LoRA-MGPO under FSDP2: a named refusal on every rank at train begin, before any step."""
    for rank in (0, 1):
        info = json.loads((runs["fsdp"] / f"{case}_refused" / f"rank{rank}.json").read_text())
        assert "does not support FSDP2" in (info["refused"] or ""), info
        assert info["global_step"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_average_is_the_full_average(runs, mode):
    """The averaged model written at the end holds the whole tensors, gathered from the shards under FSDP2."""
    for case, folder in AVERAGES.items():
        tensors, _ = _load(runs[mode], case)
        saved = load_file(str(runs[mode] / case / folder / "model.safetensors"))
        for key, value in tensors.items():
            if key.startswith("state."):
                torch.testing.assert_close(saved[key[len("state."):]], value, atol=0, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_lora_composite_is_the_dense_formula(runs, mode):
    """composed ΔW = ΔW_trained − 0.5·ΔW_other, each ΔW = (α/r)·B·A computed densely from the raw tensors."""
    trained, _ = _load(runs[mode], "lora_arithmetic")
    other = load_file(str(runs[mode] / "other" / "adapter_model.safetensors"))
    composed_dir = runs[mode] / "lora_arithmetic" / "composed"
    composed = load_file(str(composed_dir / "adapter_model.safetensors"))
    cfg = json.loads((composed_dir / "adapter_config.json").read_text())
    c_scale = cfg["lora_alpha"] / cfg["r"]
    o_cfg = json.loads((runs[mode] / "other" / "adapter_config.json").read_text())
    scale = o_cfg["lora_alpha"] / o_cfg["r"]  # the trained adapter has the same config
    modules = {k.split(".lora_A")[0] for k in other if ".lora_A" in k}
    assert modules
    for module in modules:
        t_b = trained[f"final.{module}.lora_B.default.weight"]
        t_a = trained[f"final.{module}.lora_A.default.weight"]
        o_b, o_a = other[f"{module}.lora_B.weight"], other[f"{module}.lora_A.weight"]
        want = scale * t_b @ t_a - 0.5 * scale * o_b @ o_a
        got = c_scale * composed[f"{module}.lora_B.weight"] @ composed[f"{module}.lora_A.weight"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=module)


@pytest.mark.slow
def test_swa_batchnorm_statistics_are_averaged_over_ranks(runs):
    """Each DDP rank recomputes BatchNorm statistics on its half of the data; averaged over ranks, every
    rank holds the same ones and the running mean is that of one pass over all data at the SWA weights."""
    from tests.distributed.matrix_run import BNNet, features

    (t0, _), (t1, _) = (_load(runs["ddp"], "swa_bn", r) for r in (0, 1))
    buffers = [k for k in t0 if k.startswith("buffer.")]
    assert buffers
    for key in buffers:
        assert torch.equal(t0[key], t1[key]), key
    net = BNNet()
    net.load_state_dict({k[len("final."):]: v for k, v in t0.items() if k.startswith("final.")}, strict=False)
    x = torch.tensor(features()["x"])
    with torch.no_grad():
        want = net.body[0](x).mean(dim=0)
    torch.testing.assert_close(t0["buffer.body.1.running_mean"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_hsdp_replicated_parameters_are_refused(runs):
    """On a 2-D mesh FSDP2 replicates each shard (HSDP): sums over every rank would double-count the
    copies, so selecting such parameters raises, naming the placements."""
    for r in (0, 1):
        info = json.loads((runs["fsdp"] / f"hsdp.rank{r}.json").read_text())
        assert info["placements"] == ["Replicate()", "Shard(dim=0)"]  # HSDP really was built
        assert "is a DTensor with placements (Replicate(), Shard(dim=0)) on a 2-D mesh" in info["refused"]


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory) -> tuple[list[str], dict[str, Path]]:
    """Every row of the callbacks' settings table (tests/callbacks/settings.py) that runs in a plain Trainer,
    launched once on 1 rank and once under 2-rank DDP with the same global batch."""
    from tests.callbacks.settings import SETTINGS, TRL

    cases = [f"table-{row.name}" for row in SETTINGS if row.model != TRL]
    root = tmp_path_factory.mktemp("table")
    for mode in ("single", "ddp"):
        torchrun("tests/distributed/matrix_run.py", mode, str(root / mode), *cases, nproc=MODES[mode],
                 timeout=500)
    return cases, {mode: root / mode for mode in ("single", "ddp")}


@pytest.mark.slow
def test_every_settings_row_under_ddp_equals_one_process(table_runs):
    """Driven by the settings table: a new callback gets this check by adding its row. DDP's ranks agree,
    and their final weights, the callback's state and its mode-independent metrics equal one process's."""
    cases, runs = table_runs
    assert len(cases) >= 15
    differ = {}
    for case in cases:
        ddp = [_load(runs["ddp"], case, r) for r in (0, 1)]
        assert ddp[0][1]["world_size"] == 2 and not ddp[0][1]["dtensor"], case
        try:
            _assert_same(ddp[0], ddp[1], atol=0, rtol=0)
            _assert_same(_load(runs["single"], case), ddp[0])
        except AssertionError as err:
            differ[case] = " ".join(str(err).splitlines()[:6])
    assert not differ, differ
