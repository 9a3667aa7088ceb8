"""LoRAArithmeticCallback under a 2-process CPU launch (torchrun, gloo, DDP): one composite written, the
evaluation on every rank."""

import json

import pytest
import torch

from tests.distributed.harness import torchrun
from tests.lora.conftest import make_adapter, peft_deltas, save_base


@pytest.mark.slow
def test_two_rank_ddp_writes_once_and_evaluates_on_every_rank(tmp_path):
    base = save_base(tmp_path / "base")
    other = make_adapter(base, tmp_path / "other", 5, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    torchrun("tests/distributed/lora_arithmetic_run.py", str(base), str(other), str(tmp_path))
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(
        i["world_size"] == 2 and i["active"] == "default" and i["adapters"] == ["default"] for i in infos
    )
    assert infos[0]["loss"] == pytest.approx(infos[1]["loss"], rel=1e-6)
    refs = peft_deltas(base, {"t": tmp_path / "trained", "o": other, "c": tmp_path / "run" / "composed"})
    for module, got in refs["c"].items():
        want = refs["t"].get(module, 0) - 0.5 * refs["o"].get(module, 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp folders left
