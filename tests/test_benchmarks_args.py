"""Every ``args.<name>`` a benchmark's ``main()`` reads is an option its parser declares (a lost
``add_argument`` otherwise fails only when someone runs the benchmark: ``--rounds`` once went missing)."""

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
WITH_OPTIONS = [p for p in BENCHMARKS if "add_argument" in p.read_text()]


def declared_and_read(path: Path) -> tuple[set[str], set[str]]:
    """(dests of every ``add_argument`` in the file, attributes read from any name called ``args``)."""
    declared, read = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            dest = next((k.value.value for k in node.keywords if k.arg == "dest"), None)
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if dest is None and flags:
                long = [f for f in flags if f.startswith("--")] or flags
                dest = long[0].lstrip("-").replace("-", "_")
            if dest:
                declared.add(dest)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            read.add(node.attr)
    return declared, read


@pytest.mark.parametrize("path", WITH_OPTIONS, ids=lambda p: p.name)
def test_every_option_main_reads_is_declared(path):
    declared, read = declared_and_read(path)
    assert read - declared == set(), f"{path.name}: args.{sorted(read - declared)} read but never declared"
