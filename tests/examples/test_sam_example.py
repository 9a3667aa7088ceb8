"""examples/sam_classifier.py runs as it is (offline, CPU)."""

import json

import pytest

from tests.examples import run_example


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "metric"),
    [(["--variant", "sam"], "sam/sharpness"), (["--variant", "rwp", "--lora"], "rwp/perturbation_norm"),
     (["--variant", "mgpo", "--lora"], "mgpo/perturbation_norm")],
)
def test_sam_example_runs(argv, metric):
    out = run_example("sam_classifier.py", *argv, "--steps", "10")
    result = json.loads(out.strip().splitlines()[-1])
    assert metric in result and result["eval_loss"] > 0
