"""examples/ema_encoder.py fine-tunes the real encoder with EMA and saves the EMA model."""

import pytest

from tests.examples import run_example


@pytest.mark.slow
def test_ema_encoder_example(tmp_path):
    out = run_example("ema_encoder.py", "--steps", "4", "--output-dir", str(tmp_path))
    assert "EMA averaged" in out and "live" in out
    assert (tmp_path / "ema" / "config.json").is_file()
