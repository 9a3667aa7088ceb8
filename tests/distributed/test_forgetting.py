"""ForgettingCallback under 2-rank DDP (CPU, gloo): each rank scores its share of the retention set, the sums
are all-reduced, and both ranks log what one process logs."""

from __future__ import annotations

import json

import pytest

from tests.distributed.harness import torchrun


@pytest.mark.slow
def test_ddp_logs_the_one_process_value(tmp_path):
    for mode, nproc in (("single", 1), ("ddp", 2)):
        torchrun("tests/distributed/forgetting_run.py", str(tmp_path / mode), nproc=nproc, timeout=400)
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    ddp = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["mode"]["world_size"] == 1
    assert [d["mode"] for d in ddp] == [{"wrapper": "DistributedDataParallel", "world_size": 2}] * 2
    assert sorted(single["logs"]) == ["2", "4"]
    assert ddp[0]["logs"] == ddp[1]["logs"]  # every rank logs the all-reduced value
    for step, values in single["logs"].items():
        assert set(values) == {"eval_retained_loss", "eval_retained_kl"}
        for key, want in values.items():
            assert ddp[0]["logs"][step][key] == pytest.approx(want, rel=1e-5, abs=1e-7), (step, key)
    assert single["logs"]["4"]["eval_retained_kl"] > 0
