"""The robustft command line: --help and --version answer, unknown commands fail."""

import argparse
import subprocess
import sys
from pathlib import Path

import robustft

ROOT = Path(__file__).resolve().parents[1]


def robustft_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustft", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_version_and_help():
    version = robustft_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"robustft {robustft.__version__}"
    helped = robustft_cli("--help")
    assert helped.returncode == 0 and "usage: robustft" in helped.stdout


def test_unknown_command_fails():
    proc = robustft_cli("no-such-command")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def _commands(parser, prefix: str = ""):
    """Every (sub-)command's parser below ``parser``, with its command line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from _commands(sub, f"{prefix}{name} ")


def test_writing_commands_share_the_output_options():
    from robustft.cli import add_output_options, build_parser

    reference = argparse.ArgumentParser()
    add_output_options(reference, progress=True)
    options = {a.option_strings[0]: a for a in reference._actions if a.option_strings}
    writing = {name: sub for name, sub in _commands(build_parser())
               if any("--out" in a.option_strings for a in sub._actions) and name != "demo"}  # a run folder
    assert {"merge", "interpolate", "average", "soup", "report", "lora add", "tall compress"} <= set(writing)
    for name, sub in writing.items():
        actions = {a.option_strings[0]: a for a in sub._actions if a.option_strings}
        for flag in ("--overwrite", "--no-progress"):
            if flag not in actions:
                assert flag == "--no-progress", f"robustft {name} has --out without --overwrite"
                continue
            same = type(actions[flag]) is type(options[flag]) and actions[flag].dest == options[flag].dest
            assert same, f"robustft {name} {flag}"
            if name != "search":  # --overwrite drops the study there
                assert actions[flag].help == options[flag].help, f"robustft {name} {flag}"
