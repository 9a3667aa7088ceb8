"""The robustft command line: --help and --version answer, unknown commands fail."""

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
