"""examples/lora_arithmetic.py runs as it is, offline, and its outputs load with PEFT."""

import pytest

from tests.examples import run_example


@pytest.mark.slow
def test_lora_arithmetic_example_runs(tmp_path):
    out = run_example("lora_arithmetic.py", "--out", str(tmp_path))
    assert "composite (composed) eval loss" in out
    assert (tmp_path / "run" / "composed" / "adapter_config.json").is_file()
    assert (tmp_path / "composed_r4" / "adapter_model.safetensors").is_file()
