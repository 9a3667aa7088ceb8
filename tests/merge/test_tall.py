"""TALL-mask compression of checkpoints (merge/tall.py): each extracted model is θ_0 + m_t ∘ τ_MTL computed
densely from the checkpoints in the test, the file holds 1 bit per weight per task, the command works."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from robustft.cli import main
from robustft.merge.tall import TALL_FILE, tall_compress_checkpoints, tall_extract
from tests.merge.tiny_models import build_family, load_all


def _dense(base_dir, model_dirs, task, lam):
    """The paper's formula on whole state dicts: m_t = |τ_t| ≥ λ|Σ_s τ_s − τ_t|, θ_t = θ_0 + m_t·Σ_s τ_s."""
    base = load_all(base_dir)
    models = [load_all(d) for d in model_dirs]
    out = {}
    for n, theta0 in base.items():
        taus = [m[n].double() - theta0.double() for m in models]
        mtl = sum(taus)
        keep = taus[task].abs() >= lam * (mtl - taus[task]).abs()
        out[n] = (theta0.double() + keep * mtl.to(theta0.dtype).double()).to(theta0.dtype)
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("tall"), n=3, max_shard_size="40KB")


def test_extracted_models_equal_the_dense_formula_and_load(family, tmp_path):
    base_dir, dirs = family
    result = tall_compress_checkpoints(base_dir, dirs, tmp_path / "c", lambda_=[0.4, 0.6, 0.6])
    assert result.tasks == ["ft0", "ft1", "ft2"]
    for t in range(3):
        out = tall_extract(tmp_path / "c", t, tmp_path / f"x{t}")
        got = load_all(out)
        want = _dense(base_dir, dirs, t, [0.4, 0.6, 0.6][t])
        assert set(got) == set(want)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
        assert (out / "config.json").is_file()
        model = LlamaForCausalLM.from_pretrained(out)
        torch.testing.assert_close(model.state_dict()["model.norm.weight"], want["model.norm.weight"])
    info = json.loads((tmp_path / "c" / "tall.json").read_text())
    assert info["lambda"] == {"ft0": 0.4, "ft1": 0.6, "ft2": 0.6}
    assert 0 < result.density["ft0"] < 1


def test_storage_is_one_vector_plus_one_bit_per_weight_per_task(family, tmp_path):
    base_dir, dirs = family
    result = tall_compress_checkpoints(base_dir, dirs, tmp_path / "c")
    weights = sum(t.numel() for t in load_all(base_dir).values())
    want = 4 * weights + 3 * weights / 8  # float32 τ_MTL + 3 masks of 1 bit
    assert want <= result.nbytes <= want * 1.01 + 3 * 8 * 200 + 20000  # per-tensor byte padding and header
    assert result.nbytes == (tmp_path / "c" / TALL_FILE).stat().st_size
    assert result.nbytes < 0.5 * result.inputs_nbytes


def test_one_task_comes_back_exactly(family, tmp_path):
    base_dir, dirs = family
    tall_compress_checkpoints(base_dir, dirs[:1], tmp_path / "c", tasks=["only"])
    got = load_all(tall_extract(tmp_path / "c", "only", tmp_path / "x"))
    want = load_all(dirs[0])
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)


def test_bad_inputs_are_refused_before_writing(family, tmp_path):
    base_dir, dirs = family
    with pytest.raises(ValueError, match="names must differ"):
        tall_compress_checkpoints(base_dir, dirs[:2], tmp_path / "c", tasks=["a", "a"])
    with pytest.raises(ValueError, match="lambda_: 2 values for 3 models"):
        tall_compress_checkpoints(base_dir, dirs, tmp_path / "c", lambda_=[0.5, 0.5])
    with pytest.raises(ValueError, match="lambda_"):
        tall_compress_checkpoints(base_dir, dirs, tmp_path / "c", lambda_=-1)
    assert not (tmp_path / "c").exists()
    tall_compress_checkpoints(base_dir, dirs, tmp_path / "c")
    with pytest.raises(ValueError, match="'nope' is not one of the compressed tasks"):
        tall_extract(tmp_path / "c", "nope", tmp_path / "x")
    with pytest.raises(ValueError, match="index 3 out of range"):
        tall_extract(tmp_path / "c", 3, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a TALL compression folder"):
        tall_extract(base_dir, 0, tmp_path / "x")
    other = build_family(tmp_path / "other", n=0, config=None)[0]
    sd = load_all(other)
    from safetensors.torch import save_file

    sd.pop("model.norm.weight")
    (tmp_path / "wrong").mkdir()
    save_file(sd, str(tmp_path / "wrong" / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        tall_extract(tmp_path / "c", 0, tmp_path / "x", base=tmp_path / "wrong")
    assert not (tmp_path / "x").exists()


def test_command(family, tmp_path, capsys):
    base_dir, dirs = family
    c = tmp_path / "c"
    assert main(["tall", "compress", "--base", str(base_dir), "--models", *map(str, dirs),
                 "--tasks", "a", "b", "c", "--lambda", "0.5", "--out", str(c)]) == 0
    assert "3 tasks" in capsys.readouterr().out
    assert main(["tall", "extract", str(c), "--task", "b", "--out", str(tmp_path / "b")]) == 0
    got, want = load_all(tmp_path / "b"), _dense(base_dir, dirs, 1, 0.5)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    assert main(["tall", "extract", str(c), "--task", "zz", "--out", str(tmp_path / "z")]) == 2
    assert "robustft tall: error: task: 'zz'" in capsys.readouterr().err
