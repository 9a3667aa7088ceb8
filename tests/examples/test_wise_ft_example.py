"""examples/wise_ft_classifier.py sweeps α on the real encoder and picks the best in-distribution α."""

import json

import pytest

from tests.examples import run_example


@pytest.mark.slow
def test_wise_ft_classifier_example_runs(tmp_path):
    out = run_example("wise_ft_classifier.py", "--out", str(tmp_path), "--train-size", "128",
                      "--eval-size", "64")
    curve = json.loads((tmp_path / "wise_ft.json").read_text())
    assert curve["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and "chosen alpha" in out
    ids = curve["results"]["id"]
    assert ids[curve["alphas"].index(curve["chosen_alpha"])] == max(ids)
