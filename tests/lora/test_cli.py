"""``robustft lora ...``: outputs checked through PEFT, errors exit 2 before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustft.cli import main
from robustft.lora.compose import merge_into_base
from robustft.lora.io import read_adapter
from tests.lora.conftest import make_adapter, peft_deltas, save_base, save_quantized_base

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robustft", "lora", *map(str, argv)], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.slow
def test_compose_subprocess_and_errors(lora_zoo, tmp_path):
    base, p = lora_zoo
    out = tmp_path / "composed"
    res = run_cli(
        "compose", "--adapters", p["a"], p["b"], p["c"], "--weights", "1", "1", "-0.5", "--out", out
    )
    assert res.returncode == 0, res.stderr
    refs = peft_deltas(base, {"a": p["a"], "b": p["b"], "c": p["c"], "out": out})
    for module, got in refs["out"].items():
        want = sum(w * refs[n].get(module, 0) for n, w in (("a", 1.0), ("b", 1.0), ("c", -0.5)))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a weight-count mismatch: exit 2, a message, nothing written
    bad = tmp_path / "bad"
    res = run_cli("compose", "--adapters", p["a"], p["b"], "--weights", "1", "--out", bad)
    assert res.returncode == 2 and "1 weights for 2 adapters" in res.stderr
    assert not bad.exists()


def test_add_negate_scale_compress_in_process(lora_zoo, tmp_path):
    base, p = lora_zoo
    outs = {
        "add": ["add", p["a"], p["b"]],
        "neg": ["negate", p["c"]],
        "scale": ["scale", p["b"], "--factor", "-2.5"],
        "compress": ["compress", p["b"], "--rank", "1"],
        "paper_neg": ["negate", p["a"], "--method", "paper"],
    }
    for name, argv in outs.items():
        assert main(["lora", *map(str, argv), "--out", str(tmp_path / name)]) == 0
    refs = peft_deltas(base, {"a": p["a"], "b": p["b"], "c": p["c"], **{n: tmp_path / n for n in outs}})
    close = dict(atol=1e-5, rtol=1e-5)
    for module in refs["add"]:
        torch.testing.assert_close(
            refs["add"][module], refs["a"].get(module, 0) + refs["b"].get(module, 0), **close
        )
    for module, dw in refs["c"].items():
        torch.testing.assert_close(refs["neg"][module], -dw, **close)
    for module, dw in refs["a"].items():
        torch.testing.assert_close(refs["paper_neg"][module], -dw, **close)
    for module, dw in refs["b"].items():
        torch.testing.assert_close(refs["scale"][module], -2.5 * dw, **close)
        U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
        torch.testing.assert_close(refs["compress"][module], S[0] * torch.outer(U[:, 0], Vh[0]), **close)


def test_cli_refuses_bad_input_before_writing(lora_zoo, tmp_path, capsys):
    base, p = lora_zoo
    other = make_adapter(
        save_base(tmp_path / "b2", seed=3), tmp_path / "o", 1, r=2, target_modules=["q_proj"]
    )
    out = tmp_path / "x"
    assert main(["lora", "negate", str(p["a"]), "--out", str(p["b"])]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert main(["lora", "add", str(p["a"]), str(other), "--out", str(out)]) == 2
    assert "different base models" in capsys.readouterr().err
    assert main(["lora", "compress", str(p["a"]), "--rank", "0", "--out", str(out)]) == 2
    assert "--rank" in capsys.readouterr().err
    assert main(["lora", "negate", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert not out.exists()
    assert main(["lora", "compose", "--adapters", str(p["a"]), "--method", "magic", "--out", str(out)]) == 2
    assert "--method: unknown method 'magic'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,option,recipe_params",
    [
        (["scale", "{a}", "--factor", "nan"], "--factor", {"weight": float("nan")}),
        (["scale", "{a}", "--factor", "inf"], "--factor", {"weight": float("inf")}),
        (
            ["compose", "--adapters", "{a}", "{b}", "--weights", "1", "nan"],
            "--weights[1]",
            {"weight": float("nan")},
        ),
        (
            ["compose", "--adapters", "{a}", "--method", "ties", "--density", "1.5"],
            "--density",
            {"density": 1.5},
        ),
        (
            ["compose", "--adapters", "{a}", "--method", "ties", "--density", "nan"],
            "--density",
            {"density": float("nan")},
        ),
        (
            ["compose", "--adapters", "{a}", "--method", "ties", "--density", "-0.1"],
            "--density",
            {"density": -0.1},
        ),
        (
            [
                "add",
                "{a}",
                "{b}",
                "--method",
                "dare_ties",
                "--drop-rate",
                "0.1",
                "--seed",
                "0",
                "--density",
                "2",
            ],
            "--density",
            {"density": 2.0},
        ),
        (
            ["add", "{a}", "--method", "dare_linear", "--drop-rate", "1", "--seed", "0"],
            "--drop-rate",
            {"drop_rate": 1.0},
        ),
    ],
)
def test_cli_values_are_checked_like_a_merge_recipe(lora_zoo, tmp_path, capsys, argv, option, recipe_params):
    """A bad value is refused before anything is written, with exit 2 and the option's name, by the same
    registry check that refuses it in a merge recipe."""
    from robustft.merge import parse_recipe

    _, p = lora_zoo
    out = tmp_path / "out"
    argv = [a.format(a=p["a"], b=p["b"]) for a in argv]
    assert main(["lora", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft lora: error: ") and f"{option} must be" in err, err
    assert not out.exists() and not any(x.name.startswith(".") for x in tmp_path.iterdir())
    method = "dare_ties" if "drop_rate" in recipe_params or "dare_ties" in argv else "ties"
    recipe = {
        "merge_method": method,
        "base_model": "b",
        "models": [{"model": "m", "parameters": recipe_params}],
    }
    with pytest.raises(ValueError) as recipe_err:
        parse_recipe(recipe)
    # the same check: the same words after the option's name
    assert (
        err.strip().split(f"{option} ", 1)[1]
        == str(recipe_err.value).split(".parameters.", 1)[1].split(" ", 1)[1]
    )


def test_merge_into_keeps_every_tokenizer_file_of_a_merged_checkpoint(lora_zoo, tmp_path):
    """One side-file list: ``--merge-into`` copies what ``robustft merge`` does (chat_template.jinja too)."""
    import shutil

    from robustft.merge.io import TOKENIZER_FILES

    base, p = lora_zoo
    shutil.copytree(base, tmp_path / "base")
    for name in TOKENIZER_FILES:
        (tmp_path / "base" / name).write_text(f"{name}\n")
    out = tmp_path / "dense"
    assert (
        main(["lora", "negate", str(p["a"]), "--merge-into", str(tmp_path / "base"), "--out", str(out)]) == 0
    )
    for name in TOKENIZER_FILES:
        assert (out / name).read_text() == f"{name}\n", name
    assert "chat_template.jinja" in TOKENIZER_FILES


def test_outputs_never_replace_or_contain_an_input(lora_zoo, tmp_path, capsys):
    base, p = lora_zoo
    root = Path(p["a"]).parent

    def files() -> dict[str, bytes]:
        return {str(f): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    before = files()
    for argv in (
        ["negate", p["a"], "--out", p["a"]],  # is the input
        ["add", p["a"], p["b"], "--out", root],  # contains both inputs (and the base)
        ["scale", p["a"], "--factor", "2", "--out", Path(p["a"]) / "sub"],  # lies inside the input
        ["negate", p["a"], "--merge-into", base, "--out", base],  # replaces the base it merges into
    ):
        assert main(["lora", *map(str, argv), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("robustft lora: error: output ") and "the input" in err, err
    assert files() == before
    with pytest.raises(ValueError, match="is the input"):  # the library function checks the base too
        merge_into_base(read_adapter(p["a"]), base, base, overwrite=True)


def test_model_class_must_be_a_model_class(lora_zoo, tmp_path, capsys):
    base, p = lora_zoo
    argv = ["negate", p["a"], "--merge-into", base, "--out", tmp_path / "m", "--model-class", "pipeline"]
    assert main(["lora", *map(str, argv)]) == 2
    assert "'pipeline' is not a transformers model class" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_into_a_4bit_base_writes_a_float_model_loadable_without_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    _, quantized, adapter = save_quantized_base(tmp_path, 4)
    out = tmp_path / "dense"
    assert main(["lora", "compose", "--adapters", str(adapter), "--out", str(out), "--merge-into",
                 str(quantized)]) == 0
    want = merge_into_base(read_adapter(adapter), quantized, tmp_path / "api")
    # a fresh interpreter where bitsandbytes cannot be imported loads it and gives the API's weights
    code = (
        "import sys, torch; sys.modules['bitsandbytes'] = None\n"
        "from transformers import LlamaForCausalLM\n"
        f"a = LlamaForCausalLM.from_pretrained({str(out)!r}).state_dict()\n"
        f"b = LlamaForCausalLM.from_pretrained({str(want)!r}).state_dict()\n"
        "assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'differ'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
