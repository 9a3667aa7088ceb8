"""``robustft average``: the uniform mean of a run's checkpoints, against the torch mean of their tensors."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from robustft.cli import main
from tests.tiny import tiny_llama


def _run(tmp_path, steps=(5, 10, 20, 100), shard=None):
    """A run folder with checkpoint-<step> folders (saved out of order), one random model each."""
    run = tmp_path / "run"
    for i, step in enumerate(reversed(steps)):
        kw = {"max_shard_size": shard} if shard else {}
        tiny_llama(seed=i).save_pretrained(run / f"checkpoint-{step}", **kw)
        (run / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"not read")
    return run


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _mean(folders):
    states = [_weights(f) for f in folders]
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_average_is_the_torch_mean_of_the_checkpoints(tmp_path, shard):
    run = _run(tmp_path, shard=shard)
    inputs = [str(run / "checkpoint-5"), str(run / "checkpoint-20")]
    assert main(["average", *inputs, "--out", str(tmp_path / "avg"), "--no-progress"]) == 0
    ref = _mean([run / "checkpoint-5", run / "checkpoint-20"])
    got = _weights(tmp_path / "avg")
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-7, rtol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "avg")  # a loadable model folder
    torch.testing.assert_close(model.get_parameter("lm_head.weight").detach(), ref["lm_head.weight"])


def test_run_folder_and_glob_sorted_by_step_with_last(tmp_path):
    run = _run(tmp_path)
    latest = [run / "checkpoint-20", run / "checkpoint-100"]  # by step, not by name (100 < 20 as text)
    assert main(["average", str(run), "--last", "2", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    pattern = str(run / "checkpoint-*")
    assert main(["average", pattern, "--last", "2", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    ref = _mean(latest)
    for out in ("a", "b"):
        got = _weights(tmp_path / out)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-7, rtol=1e-6)
    assert main(["average", str(run), "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    torch.testing.assert_close(_weights(tmp_path / "all")["lm_head.weight"],
                               _mean(sorted(run.iterdir()))["lm_head.weight"], atol=1e-7, rtol=1e-6)


def test_peft_adapters_average_their_deltas(tmp_path):
    from robustft.lora.io import read_adapter

    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        model.save_pretrained(tmp_path / f"checkpoint-{seed + 1}")
        folders.append(tmp_path / f"checkpoint-{seed + 1}")
    assert main(["average", *map(str, folders), "--out", str(tmp_path / "avg")]) == 0
    out = read_adapter(tmp_path / "avg")
    inputs = [read_adapter(f) for f in folders]
    for module, delta in out.deltas.items():
        ref = torch.stack([a.deltas[module].dense() for a in inputs]).mean(0)
        torch.testing.assert_close(delta.dense(), ref, atol=1e-6, rtol=1e-5)


def test_refusals_before_anything_is_written(tmp_path, capsys):
    run = _run(tmp_path, steps=(1, 2))
    (tmp_path / "exists").mkdir()
    capsys.readouterr()
    cases = [
        ([str(run), "--out", str(tmp_path / "exists")], "exists"),
        ([str(run), "--out", str(run / "checkpoint-1" / "x")], "checkpoint-1"),
        ([str(run / "nothing-*"), "--out", str(tmp_path / "o")], "matches nothing"),
        ([str(run), "--last", "0", "--out", str(tmp_path / "o")], "--last"),
        ([str(run / "checkpoint-1"), str(run / "checkpoint-1"), "--out", str(tmp_path / "o")], "twice"),
    ]
    for argv, message in cases:
        assert main(["average", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("robustft average: error:") and message in err, err
    assert not (tmp_path / "o").exists()
