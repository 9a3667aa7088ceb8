"""WiSE-FT sweep under a 2-process CPU launch (gloo, DDP): the Trainer's distributed evaluation."""

import json

import pytest

from tests.distributed.harness import torchrun


@pytest.mark.slow
def test_sweep_uses_distributed_evaluation(tmp_path):
    torchrun("tests/distributed/wise_ft_run.py", str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["curve"]["results"] == r1["curve"]["results"]  # every rank sees the gathered metrics
    assert r0["curve"]["chosen_alpha"] == r1["curve"]["chosen_alpha"]
    for name, values in r0["brute"].items():  # metrics over the whole eval set, not a rank's half
        assert values == pytest.approx(r0["curve"]["results"][name], rel=1e-4, abs=1e-6), name
    assert json.loads((tmp_path / "wise_ft.json").read_text())["results"] == r0["curve"]["results"]
    assert not list(tmp_path.glob("*.tmp*"))
