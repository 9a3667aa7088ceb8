"""Every robustft callback under DeepSpeed ZeRO-1/2/3 on 2 CPU ranks, against a DDP run and brute force.

One launch per mode (tests/distributed/deepspeed_run.py); the DDP launch is the reference for the
one-pass perturbations and WiSE-FT (same seed, data and global batch). Averages are checked against
a brute-force average of the full weights recorded after every step, and after a resume.
"""

import functools
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.harness import torchrun

pytestmark = pytest.mark.slow
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8)", allow_module_level=True)


@functools.cache
def launch(mode: str, out: str) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    torchrun("tests/distributed/deepspeed_run.py", mode, out, env={"DS_ACCELERATOR": "cpu"})
    infos = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(Path(out) / f"rank{r}.safetensors")) for r in (0, 1)]
    return infos, tensors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepspeed")
    return lambda mode: launch(mode, str(base / mode))


def assert_ranks_agree(tensors):
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key


def group(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def assert_close_groups(a: dict, b: dict, tol: float = 1e-5):
    assert a and a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("mode", ["zero1", "zero2", "zero3"])
def test_callbacks_under_zero(runs, mode):
    stage = int(mode[-1])
    infos, tensors = runs(mode)
    ref_infos, ref = runs("ddp")
    assert all(i["world_size"] == 2 for i in infos + ref_infos)
    for run in ("plain", "avg", "wise"):  # the mode that really ran
        for info in infos:
            assert info[run]["deepspeed"] and info[run]["engine"] and info[run]["stage"] == stage
            assert info[run]["partitioned"] == (stage == 3)
    assert_ranks_agree(tensors)
    t, r = tensors[0], ref[0]
    # DeepSpeed trains as DDP does: same weights after 4 steps (same seed, data, global batch)
    assert_close_groups(group(t, "plain"), group(r, "plain"))

    # averaging: brute force on the recorded full weights; the resumed run equals the uninterrupted one
    for key in ("ema", "swa", "lawa", "momentum"):
        assert_close_groups(group(t, key), group(t, f"brute_{key}"), tol=1e-6)
        assert_close_groups(group(t, f"resumed_{key}"), group(t, key), tol=1e-6)
    info = infos[0]
    assert info["live_unchanged"]
    # evaluating with the EMA weights swapped in after every step did not change training
    assert len(info["ema_eval_losses"]) == 4
    assert_close_groups(group(t, "avg_live"), group(t, "plain"), tol=1e-6)
    assert infos[1]["ema_distance"] == pytest.approx(info["ema_distance"], rel=1e-9)
    assert info["ema_distance"] == pytest.approx(info["ema_distance_brute"], rel=1e-5)
    # callback state beside the checkpoint: one file, or one per rank for ZeRO-3 partitions
    expected = ["ema.rank0.safetensors", "ema.rank1.safetensors"] if stage == 3 else ["ema.safetensors"]
    assert set(expected) <= set(info["state_files"])
    # the EMA model saved at the end (gathered from partitions under ZeRO-3, written by rank 0)
    saved = load_file(str(Path(info["out"]) / "avg" / "ema" / "model.safetensors"))
    assert_close_groups({k: saved[k] for k in group(t, "ema")}, group(t, "ema"), tol=0)

    # WiSE-FT: θ(α) in the model, also after a resume from step 2; the α-sweep's curve equals DDP's
    assert_close_groups(group(t, "wise"), group(t, "wise_ref"), tol=1e-6)
    assert_close_groups(group(t, "wise_resumed"), group(t, "wise"), tol=1e-6)
    for alpha, value in ref_infos[0]["wise_curve"].items():
        assert info["wise_curve"][alpha] == pytest.approx(value, rel=1e-5)
    assert info["wise_files"] == ["wise_ft.csv", "wise_ft.json", "wise_ft.png"]

    # LoRA arithmetic: the composite written by rank 0 is 0.5·ΔW of the trained adapter (gathered here)
    assert info["lora"]["stage"] == stage
    out = Path(info["out"]) / "lora" / "composed"
    composed = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    trained = group(t, "lora_trained")
    modules = [k[: -len(".lora_A.weight")] for k in trained if k.endswith(".lora_A.weight")]
    assert modules
    for m in modules:
        delta = 0.5 * (8 / 2) * trained[f"{m}.lora_B.weight"] @ trained[f"{m}.lora_A.weight"]  # α=8, r=2
        written = composed[f"{m}.lora_B.weight"] @ composed[f"{m}.lora_A.weight"]
        torch.testing.assert_close(written * config["lora_alpha"] / config["r"], delta, atol=1e-6, rtol=1e-5)
        assert delta.abs().max() > 0

    # exact SAM and LoRA-MGPO are refused by name under every stage, at train begin (MGPO runs under DDP)
    assert "SAMCallback does not support DeepSpeed" in info["sam_refused"]
    assert "MGPOCallback does not support DeepSpeed" in info["mgpo_refused"]
    assert ref_infos[0]["mgpo_refused"] is None and group(r, "mgpo")
    # one-pass perturbations act and are undone before the engine's step: = DDP under ZeRO-1/2, and for
    # MSAM (element-wise) under ZeRO-3; ZeRO-3 draws RWP noise per partition (law tested below)
    for name in ("rwp", "msam"):
        assert info[f"{name}_refused"] is None
        assert any(not torch.allclose(v, t["plain." + k]) for k, v in group(t, name).items())
        if stage < 3 or name == "msam":
            assert_close_groups(group(t, name), group(r, name))
    if stage == 3:
        assert "stage3_param_persistence_threshold" in info["persistent_refused"]
        # examples/accelerate/ds_zero3.json partitions every parameter: EMA and RWP run on it
        assert info["shipped_refused"] is None
        assert info["shipped"]["stage"] == 3 and info["shipped"]["partitioned"]


def expected_row_std(weights: dict[str, torch.Tensor], eps: dict[str, torch.Tensor], rho: float, lora: bool):
    """RWP's std_i = ρ·‖W_{i,:}‖/√n for every tensor with a perturbation; Flat-LoRA: W = W₀ + s·B·A."""
    stds = {}
    for name, e in eps.items():
        if not e.any():
            continue
        w = weights[name].double()
        if lora:  # s = lora_alpha / r = 8 / 2
            prefix = name[: -len("base_layer.weight")]
            w = w + 4.0 * weights[prefix + "lora_B.default.weight"].double() @ weights[
                prefix + "lora_A.default.weight"].double()
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        stds[name] = (rho * rows.norm(dim=1) / math.sqrt(rows.shape[1])).reshape((-1,) + (1,) * (w.dim() - 1))
    return stds


@pytest.mark.parametrize("mode", ["ddp", "zero3"])
@pytest.mark.parametrize("name", ["rwp_rows", "flat_lora"])
def test_row_wise_perturbations_have_the_rwp_law_on_zero3_partitions(runs, mode, name):
    """ZeRO-3 forms row norms from flat partitions and maps each element to its row: the perturbation
    seen in the gathered weights is N(0, ρ²/n·‖W_i‖²) per row, as under DDP (the same check), logged
    norms are the whole model's, and training at learning rate 0 leaves the weights bit-exact."""
    infos, tensors = runs(mode)
    info, t = infos[0], tensors[0]
    if mode == "zero3":
        assert info[name]["stage"] == 3 and info[name]["partitioned"]
    assert info[f"{name}_exact"] and infos[1][f"{name}_exact"]
    z, eps_prev, weights = [], None, group(t, f"{name}_w")
    for step in range(4):
        eps = group(t, f"{name}_eps{step}")
        stds = expected_row_std(weights, eps, 0.05, lora=name == "flat_lora")
        if name == "flat_lora":  # only the base weights of the LoRA layers, and all of them
            assert sorted(stds) == sorted(k for k in eps if k.endswith("base_layer.weight"))
            assert len(stds) == 4
        else:
            assert len(stds) == len(eps)
        z += [eps[n].double() / std for n, std in stds.items()]
        norm = math.sqrt(sum(float(e.double().pow(2).sum()) for e in eps.values()))
        assert info[f"{name}_norms"][step] == pytest.approx(norm, rel=1e-4)
        if eps_prev is not None:
            assert not torch.equal(eps[next(iter(stds))], eps_prev[next(iter(stds))])  # a new draw each step
        eps_prev = eps
    # per row (≥ 64 draws over the 4 steps; the run spreads row norms 1-7x apart): mean z² ≈ 1, so every
    # element was scaled by its own row's norm, summed over the ranks that hold the row
    rows = [torch.stack([zi.reshape(zi.shape[0], -1) if zi.dim() > 1 else zi.reshape(1, -1)
                         for zi in z[k::len(stds)]], dim=1).flatten(1) for k in range(len(stds))]
    mean_sq = torch.cat([r.pow(2).mean(dim=1) for r in rows])
    assert min(r.shape[1] for r in rows) >= 64
    assert 0.4 < float(mean_sq.min()) and float(mean_sq.max()) < 1.9, (mean_sq.min(), mean_sq.max())
    z = torch.cat([zi.flatten() for zi in z])
    assert z.numel() >= 4000
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)


def test_slerp_on_zero3_partitions_equals_ddp(runs):
    """WiSE-FT's slerp (angles from partitions) equals DDP's."""
    infos, tensors = runs("zero3")
    _, ref = runs("ddp")
    assert infos[0]["slerp"]["stage"] == 3 and infos[0]["slerp"]["partitioned"]
    assert_close_groups(group(tensors[0], "slerp"), group(ref[0], "slerp"), tol=1e-5)
    assert any(not torch.allclose(v, tensors[0]["plain." + k]) for k, v in group(tensors[0], "slerp").items())
