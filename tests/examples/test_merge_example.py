"""examples/merge_models.py runs as shipped: fine-tunes three tiny Llamas, merges them with the example
recipe, and the merged model does better on average over the three tasks than any single fine-tune."""

import re

import pytest

from tests.examples import run_example


@pytest.mark.slow
def test_merge_example_runs_and_merge_beats_single_finetunes(tmp_path):
    out = run_example("merge_models.py", "--workdir", str(tmp_path))
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+\s+[\d.]+\s+[\d.]+)$", out, flags=re.M))
    mean = {k: sum(map(float, v.split())) / 3 for k, v in rows.items()}
    assert set(mean) == {"base", "ft_stride1", "ft_stride2", "ft_stride3", "merged"}, out
    assert mean["merged"] < min(mean[f"ft_stride{s}"] for s in (1, 2, 3)), mean
    assert (tmp_path / "merged" / "config.json").is_file()
