"""Every robustft callback under DeepSpeed ZeRO-1/2/3 on 2 CPU ranks, against a DDP run and brute force.

One launch per mode (tests/distributed/deepspeed_run.py); the DDP launch is the reference for the
one-pass perturbations and WiSE-FT (same seed, data and global batch). Averages are checked against
a brute-force average of the full weights recorded after every step, and after a resume.
"""

import functools
import importlib.util
import json
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
    assert infos[1]["ema_distance"] == pytest.approx(info["ema_distance"], rel=1e-9)
    assert info["ema_distance"] == pytest.approx(info["ema_distance_brute"], rel=1e-5)
    # callback state beside the checkpoint: one file, or one per rank for ZeRO-3 partitions
    expected = ["ema.rank0.safetensors", "ema.rank1.safetensors"] if stage == 3 else ["ema.safetensors"]
    assert set(expected) <= set(info["state_files"])
    # the EMA model saved at the end (gathered from partitions under ZeRO-3, written by rank 0)
    saved = load_file(str(Path(info["out"]) / "avg" / "ema" / "model.safetensors"))
    assert_close_groups({k: saved[k] for k in group(t, "ema")}, group(t, "ema"), tol=0)

    # WiSE-FT: θ(α) in the model; the α-sweep's curve equals DDP's
    assert_close_groups(group(t, "wise"), group(t, "wise_ref"), tol=1e-6)
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

    # exact SAM is refused under every stage
    assert "SAMCallback does not support DeepSpeed" in info["sam_refused"]
    # one-pass perturbations: exact (= DDP) under ZeRO-1/2; under ZeRO-3 MSAM (element-wise) acts on the
    # partitions, the row-wise ones are refused
    for name, cls in (("rwp", "RandomPerturbationCallback"), ("msam", "MomentumSAMCallback"),
                      ("ggpo", "GGPOCallback")):
        if stage == 3 and name != "msam":
            assert info[f"{name}_refused"].startswith(f"{cls} does not support DeepSpeed ZeRO-3")
        else:
            assert info[f"{name}_refused"] is None
            # the perturbation did act (differs from plain training) and was undone before the step
            assert any(not torch.allclose(v, t["plain." + k]) for k, v in group(t, name).items())
            assert_close_groups(group(t, name), group(r, name))
    if stage == 3:
        assert "method='slerp') does not support DeepSpeed ZeRO-3" in info["slerp_refused"]
        assert "stage3_param_persistence_threshold" in info["persistent_refused"]
