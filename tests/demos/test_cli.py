"""demos/cli.py: ``robustft demo``'s options reach the demo they run, and bad ones are refused by name
before anything runs (the demos themselves are stubbed: their runs are tested in test_encoder.py and
test_llm.py)."""

import pytest

from robustft.cli import main


@pytest.fixture
def calls(monkeypatch):
    """Stub both demos; the list of (demo, args, kwargs) they were called with."""
    from robustft.demos import encoder, llm

    seen = []
    monkeypatch.setattr(encoder, "run_demo", lambda *a, **k: seen.append(("encoder", a, k)))
    monkeypatch.setattr(llm, "run_llm_demo", lambda *a, **k: seen.append(("llm", a, k)))
    return seen


def test_demo_cli_refuses_tiny_sizes(capsys, calls):
    assert main(["demo", "--train-size", "3"]) == 2
    assert "--train-size" in capsys.readouterr().err
    assert main(["demo", "--eval-size", "7"]) == 2
    assert "--eval-size" in capsys.readouterr().err
    assert calls == []


@pytest.mark.parametrize("flag", [["--steps", "3"], ["--full"], ["--cache-dir", "c"], ["--wordnet-dir", "w"],
                                  ["--4bit"]])
def test_llm_options_without_llm_are_refused_by_name(capsys, calls, flag):
    assert main(["demo", *flag]) == 2
    assert capsys.readouterr().err.startswith(f"robustft demo: error: {flag[0]}: only with --llm")
    assert calls == []


def test_llm_steps_must_be_positive(capsys, calls):
    assert main(["demo", "--llm", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert calls == []


def test_encoder_demo_gets_the_documented_defaults_and_the_given_sizes(calls, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert main(["demo", "--train-size", "16", "--eval-size", "8", "--epochs", "1"]) == 0
    (_, first, _), (_, second, _) = calls
    assert first[:5] == (str(tmp_path), 3, 400, 300, 2.0)  # the --help defaults
    assert second[:5] == ("runs/wise_ft_demo", 0, 16, 8, 1.0)


def test_gloss_task_reaches_the_encoder_demo_with_its_wordnet_folder(capsys, calls):
    assert main(["demo", "--task", "glosses", "--wordnet-dir", "wn"]) == 0
    (name, _, kwargs), = calls
    assert name == "encoder" and kwargs["task"] == "glosses" and kwargs["wordnet"] == "wn"
    assert main(["demo", "--llm", "--task", "glosses"]) == 2
    assert "--task: encoder demo only" in capsys.readouterr().err
    assert len(calls) == 1


def test_llm_demo_gets_its_config_with_the_given_sizes(calls):
    from robustft.demos.llm import FAST, FULL

    assert main(["demo", "--llm", "--train-size", "9", "--steps", "2"]) == 0
    assert main(["demo", "--llm", "--full"]) == 0
    (name, (out, cfg), _), (_, (_, full), _) = calls
    assert name == "llm" and out == "runs/llm_demo"
    assert (cfg.n_train, cfg.steps, cfg.n_eval) == (9, 2, FAST.n_eval)
    assert (full.n_train, full.steps, full.n_eval) == (FULL.n_train, FULL.steps, FULL.n_eval)


def test_llm_demo_4bit_asks_for_an_nf4_base(calls):
    assert main(["demo", "--llm", "--4bit"]) == 0
    assert main(["demo", "--llm"]) == 0
    (_, (_, cfg), _), (_, (_, plain), _) = calls
    assert cfg.bits == 4 and plain.bits is None
