"""``robustft soup``: uniform (as ``robustft average``) and greedy (scored by a user function named on the
command line) soups, against the torch mean of the kept checkpoints and a hand-written loop of Alg. 1."""

import json

import torch
from safetensors.torch import load_file

from robustft.cli import main
from tests.tiny import tiny_llama

SCORER = """
from safetensors.torch import load_file
import torch

TARGET = {n: t + 0.01 for n, t in load_file(r"%s").items()}


def score(model):
    state = model.state_dict()
    return {"id": -sum(float((state[n] - TARGET[n]).pow(2).sum()) for n in TARGET), "ood": 0.5}
"""


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _mean(states):
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def test_greedy_soup_from_the_command_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    for i in range(4):
        tiny_llama(seed=i).save_pretrained(run / f"checkpoint-{i + 1}")
    states = [_weights(run / f"checkpoint-{i + 1}") for i in range(4)]
    from safetensors.torch import save_file

    save_file(_mean(states[1:3]), str(tmp_path / "target.safetensors"))
    (tmp_path / "my_scores.py").write_text(SCORER % (tmp_path / "target.safetensors"))
    monkeypatch.syspath_prepend(str(tmp_path))
    target = {n: t + 0.01 for n, t in _mean(states[1:3]).items()}

    def ref(state):
        return -sum(float((state[n] - target[n]).pow(2).sum()) for n in target)

    alone = [ref(s) for s in states]  # Alg. 1 by hand
    order = sorted(range(4), key=lambda i: -alone[i])
    kept, best = [order[0]], alone[order[0]]
    for i in order[1:]:
        trial = ref(_mean([states[j] for j in [*kept, i]]))
        if trial >= best:
            kept, best = [*kept, i], trial
    assert 1 < len(kept) < 4, kept
    argv = [
        "soup",
        str(run),
        "--method",
        "greedy",
        "--score",
        "my_scores:score",
        "--out",
        str(tmp_path / "soup"),
        "--report",
        str(tmp_path / "report"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "greedy soup of" in capsys.readouterr().out
    got, want = _weights(tmp_path / "soup"), _mean([states[i] for i in kept])
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-7, rtol=1e-6)
    report = json.loads((tmp_path / "report" / "soup.json").read_text())
    assert sorted(report["kept"]) == sorted(str(run / f"checkpoint-{i + 1}") for i in kept)


def test_refusals_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    for i in range(2):
        tiny_llama(seed=i).save_pretrained(run / f"checkpoint-{i + 1}")
    capsys.readouterr()
    cases = [
        ([str(run), "--method", "greedy"], "--score"),
        ([str(run), "--method", "greedy", "--score", "no_such_module_xyz:f"], "cannot import"),
        ([str(run), "--method", "greedy", "--score", "nocolon"], "MODULE:FUNCTION"),
        ([str(run), "--score", "os:getcwd"], "--method greedy"),
        ([str(run), "--last", "0"], "--last"),
    ]
    for argv, message in cases:
        assert main(["soup", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("robustft soup: error:") and message in err, err
    assert not (tmp_path / "o").exists()
