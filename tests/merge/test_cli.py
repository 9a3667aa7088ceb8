"""merge/cli.py: ``robustft merge`` takes mergekit-yaml's flags and positional output, each checked against
mergekit run in the test or against the same recipe through the Python API."""

from __future__ import annotations

import pytest
import torch

from robustft.cli import main
from robustft.merge import merge_checkpoints, parse_recipe
from tests.merge.tiny_models import load_all, max_diff, mergekit_options, recipe_models

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402


def test_merge_takes_mergekit_yaml_flags_and_positional_output(deep, tmp_path, capsys):
    base, dirs = deep
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "models": recipe_models(dirs[:2], [{"density": 0.5, "weight": 1.0},
                                           {"density": 0.7, "weight": 0.5}])}  # fmt: skip
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    args = ["merge", str(path), str(tmp_path / "out"), "--lazy-unpickle", "--allow-crimes",
            "--copy-tokenizer", "--out-shard-size", "50K", "--random-seed", "3", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "out"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1  # 50K = 50,000 bytes per shard, as mergekit counts them
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), mergekit_options())
    assert max_diff(load_all(tmp_path / "mk"), load_all(out)) < 2e-6
    # --out still works; both at once is an error; --cuda without CUDA is refused by name
    assert main(["merge", str(path), "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert main(["merge", str(path), str(tmp_path / "o3"), "--out", str(tmp_path / "o4")]) == 2
    assert "give the output folder once" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["merge", str(path), str(tmp_path / "o5"), "--cuda"]) == 2
        assert "--cuda" in capsys.readouterr().err
    assert main(["merge", str(path), str(tmp_path / "o6"), "--no-copy-tokenizer", "--no-progress"]) == 0


def test_random_seed_flag_is_the_recipe_seed(deep, tmp_path):
    """``--random-seed N`` is the recipe's ``seed: N`` (the draws of the random methods)."""
    base, dirs = deep
    import yaml

    recipe = {"merge_method": "della_linear", "base_model": str(base), "dtype": "float32",
              "models": recipe_models(dirs[:1], [{"density": 0.5, "epsilon": 0.1}])}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "a"), "--random-seed", "5", "--no-progress"]) == 0
    merge_checkpoints(parse_recipe({**recipe, "seed": 5}), tmp_path / "b", progress=False)
    a, b = load_all(tmp_path / "a"), load_all(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
