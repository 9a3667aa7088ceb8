"""merge/interpolate.py: ``robustft interpolate`` and ``interpolate_checkpoints`` between two checkpoints,
against the functional API (interpolate_state_dicts) and the merge recipe; bad inputs refused
before writing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from robustft.cli import main
from robustft.interpolation.wise_ft import interpolate_models, interpolate_state_dicts
from robustft.merge.interpolate import interpolate_checkpoints
from tests.tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def _llama(seed, hidden=32, dtype=torch.float32):
    return tiny_llama(seed, hidden).to(dtype).eval()


def _save(model, path, shard=None):
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a, b = _llama(0), _llama(1)
    _save(a, d / "start", shard="20KB")  # sharded input, several files + index
    _save(b, d / "end")
    (d / "end" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return a, b, d


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_cli_output_loads_and_matches_functional_api(pair, tmp_path, method):
    a, b, d = pair
    assert (d / "start" / "model.safetensors.index.json").is_file()
    out = tmp_path / "mid"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustft",
            "interpolate",
            "--start",
            str(d / "start"),
            "--end",
            str(d / "end"),
            "--alpha",
            "0.3",
            "--method",
            method,
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want = interpolate_models(a, b, 0.3, method=method)
    got = loaded.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    if method == "linear":  # the dense formula, by hand
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            torch.testing.assert_close(got[k], 0.7 * sa[k] + 0.3 * sb[k], msg=k)


def test_sharded_end_keeps_its_layout_and_bf16(tmp_path):
    a, b = _llama(2, dtype=torch.bfloat16), _llama(3, dtype=torch.bfloat16)
    _save(a, tmp_path / "s")
    _save(b, tmp_path / "e", shard="20KB")
    interpolate_checkpoints(tmp_path / "s", tmp_path / "e", tmp_path / "o", 0.5)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for f in set(index["weight_map"].values()):
        merged.update(load_file(str(tmp_path / "o" / f)))  # the safetensors library reads our files
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in merged.items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(
            v.float(), (0.5 * sa[k].float() + 0.5 * sb[k].float()).bfloat16().float(), msg=k
        )
    # endpoints bit-exact
    interpolate_checkpoints(tmp_path / "s", tmp_path / "e", tmp_path / "o1", 1.0)
    interpolate_checkpoints(tmp_path / "s", tmp_path / "e", tmp_path / "o0", 0.0)
    sd1 = AutoModelForCausalLM.from_pretrained(tmp_path / "o1", dtype=torch.bfloat16).state_dict()
    sd0 = AutoModelForCausalLM.from_pretrained(tmp_path / "o0", dtype=torch.bfloat16).state_dict()
    for k in sa:
        assert torch.equal(sd1[k], sb[k]) and torch.equal(sd0[k], sa[k]), k


def test_shape_mismatch_names_the_tensor_and_writes_nothing(tmp_path, capsys):
    _save(_llama(0), tmp_path / "a")
    _save(_llama(1, hidden=48), tmp_path / "b")
    code = main(
        [
            "interpolate",
            "--start",
            str(tmp_path / "a"),
            "--end",
            str(tmp_path / "b"),
            "--alpha",
            "0.5",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "tensor 'lm_head.weight': shape (64, 32) in start but (64, 48) in end" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_key_mismatch_names_the_tensor_and_writes_nothing(tmp_path):
    _save(_llama(0), tmp_path / "a")
    sd = _llama(1).state_dict()
    sd.pop("model.layers.1.mlp.up_proj.weight")
    from safetensors.torch import save_file

    (tmp_path / "b").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        interpolate_checkpoints(tmp_path / "a", tmp_path / "b", tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists() and len(list(tmp_path.iterdir())) == 2


def test_refuses_overwrite_alpha_and_missing_inputs(pair, tmp_path, capsys):
    _, _, d = pair
    args = ["interpolate", "--start", str(d / "start"), "--end", str(d / "end"), "--out", str(tmp_path / "o")]
    assert main([*args, "--alpha", "1.5"]) == 2 and "extrapolat" in capsys.readouterr().err
    assert main([*args, "--alpha", "1.5", "--extrapolate"]) == 0
    assert main([*args, "--alpha", "0.5"]) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--alpha", "0.5", "--overwrite"]) == 0
    info = json.loads((tmp_path / "o" / "robustft_interpolate.json").read_text())
    assert info["alpha"] == 0.5
    code = main(
        [
            "interpolate",
            "--start",
            str(tmp_path / "nope"),
            "--end",
            str(d / "end"),
            "--alpha",
            "0.5",
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_tokenizer_files_are_copied(pair, tmp_path):
    _, _, d = pair
    interpolate_checkpoints(d / "start", d / "end", tmp_path / "o", 0.5)
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["model_max_length"] == 32


def test_peft_adapter_folders_are_refused_with_a_hint(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter.*merge_and_unload"):
        interpolate_checkpoints(tmp_path / "ad", tmp_path / "ad", tmp_path / "o", 0.5)
    assert not (tmp_path / "o").exists()


def _load_folder(path):
    index = path / "model.safetensors.index.json"
    files = {"model.safetensors"}
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_cli_functional_api_and_merge_recipe_give_identical_bits(tmp_path, method, dtype):
    """One interpolation: `robustft interpolate`, robustft.interpolation.wise_ft.interpolate_state_dicts and
    a merge recipe
    (`robustft merge`, lerp/slerp with the start as base) write exactly the same tensors."""
    import yaml

    a, b = _llama(4, dtype=dtype), _llama(5, dtype=dtype)
    _save(a, tmp_path / "start", shard="20KB")
    _save(b, tmp_path / "end")
    sa, sb = a.state_dict(), b.state_dict()
    for alpha in (0.1, 0.3, 0.5, 0.77):
        cli_out, merge_out = tmp_path / f"cli{alpha}", tmp_path / f"merge{alpha}"
        args = ["--start", str(tmp_path / "start"), "--end", str(tmp_path / "end"), "--method", method]
        assert main(["interpolate", *args, "--alpha", str(alpha), "--out", str(cli_out)]) == 0
        recipe = {
            "merge_method": "lerp" if method == "linear" else "slerp",
            "base_model": str(tmp_path / "start"),
            "models": [str(tmp_path / "end")],
            "parameters": {"t": alpha},
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(merge_out), "--no-progress"]) == 0
        api = interpolate_state_dicts(sa, sb, alpha, method=method)
        cli, merged = _load_folder(cli_out), _load_folder(merge_out)
        assert sorted(cli) == sorted(merged) == sorted(api)
        for k, v in api.items():
            assert v.dtype == dtype and cli[k].dtype == dtype and merged[k].dtype == dtype, k
            assert torch.equal(cli[k], v) and torch.equal(merged[k], v), (k, alpha)
