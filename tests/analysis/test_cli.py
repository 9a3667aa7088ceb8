"""``robustft report`` on the command line: a run on a tiny adapter, and bad input refused with exit code 2,
the option or file:line named, and nothing written."""

import json
import re

import pytest

from robustft.cli import main
from tests.analysis.retention_helpers import ID_ROWS, PROMPTS, TEMPLATE, WORDS, save_adapter, write_jsonl
from tests.tiny import tiny_llama_folder


@pytest.fixture
def argv(tmp_path):
    base = tiny_llama_folder(tmp_path / "base", WORDS, TEMPLATE)
    adapter = save_adapter(base, tmp_path / "adapter")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    ids = write_jsonl(tmp_path / "id.jsonl", ID_ROWS)
    return ["report", "--base", str(base), "--adapter", str(adapter), "--id", str(ids),
            "--prompts", str(prompts), "--alphas", "0,0.5,1", "--max-new-tokens", "6",
            "--out", str(tmp_path / "out")]


def test_report_prints_the_table_and_writes_the_outputs(argv, tmp_path, capsys):
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["alphas"] == [0.0, 0.5, 1.0] and data["inputs"]["adapter"] == str(tmp_path / "adapter")
    assert "| alpha | id loss | retained loss | retained KL | note" in stdout
    assert f"α*={data['chosen_alpha']:g} (chosen on id loss only)" in stdout


def replace(argv, option, value):
    out = list(argv)
    out[out.index(option) + 1] = str(value)
    return out


@pytest.mark.parametrize("case, message", [
    ("no base config", "--base .*base: no config.json"),
    ("no adapter", "--adapter .*nowhere"),
    ("bad id row", r"--id .*bad.jsonl:2: expected one of"),
    ("bad id json", r"--id .*bad.jsonl:1: not valid JSON"),
    ("missing id", "--id .*missing.jsonl: file not found"),
    ("bad alpha", "alphas"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(argv, tmp_path, capsys, case, message):
    if case == "no base config":
        (tmp_path / "base" / "config.json").unlink()
    elif case == "no adapter":
        argv = replace(argv, "--adapter", tmp_path / "nowhere")
    elif case == "bad id row":
        argv = replace(argv, "--id", write_jsonl(tmp_path / "bad.jsonl", [ID_ROWS[0], {"text": "x"}]))
    elif case == "bad id json":
        (tmp_path / "bad.jsonl").write_text("{not json\n")
        argv = replace(argv, "--id", tmp_path / "bad.jsonl")
    elif case == "missing id":
        argv = replace(argv, "--id", tmp_path / "missing.jsonl")
    elif case == "bad alpha":
        argv = replace(argv, "--alphas", "0,1.5")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft report: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_model_and_adapter_together_are_a_usage_error(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", str(tmp_path / "base")])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
