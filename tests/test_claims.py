"""docs/claims.md cannot rot: every file it quotes and every test it names exists (test functions found by
ast, no import), and every row names a test or says why it has none."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "docs" / "claims.md"
NODE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
#: tests other branches of issue 22 are adding (decoupled L2-SP, item 5): allowed to be missing until merged,
#: and must be taken out of this set once they exist (test_pending_tests_are_still_missing fails then)
PENDING: frozenset[str] = frozenset()
SOURCE = re.compile(r"`((?:docs|robustft|examples|README)[\w/.]*?\.(?:md|py)):(\d+)`")


def claim_rows(text: str) -> list[tuple[str, str, str]]:
    """(claim, reference, test) cells of every table row of ``text`` (header and rule rows left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| claim (") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 3, f"docs/claims.md: a row needs 3 cells (claim | reference | test): {line!r}"
        rows.append((cells[0], cells[1], cells[2]))
    return rows


@cache
def defined_tests(path: str) -> frozenset[str]:
    """Names of the module-level ``test_*`` functions of ``path`` (read with ast, not imported)."""
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    return frozenset(
        n.name for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    )


def test_claims_table_is_parsed():
    rows = claim_rows(CLAIMS.read_text())
    assert len(rows) > 50
    assert sum(len(NODE.findall(test)) for _, _, test in rows) > 80


def test_every_listed_test_exists():
    missing = []
    for _, _, test in claim_rows(CLAIMS.read_text()):
        for path, name in NODE.findall(test):
            if f"{path}::{name}" in PENDING:
                continue
            if not (ROOT / path).is_file() or name not in defined_tests(path):
                missing.append(f"{path}::{name}")
    assert not missing, f"docs/claims.md names tests that do not exist: {missing}"


def test_every_row_quotes_an_existing_file_line_and_has_a_test_or_a_reason():
    bad = []
    for claim, reference, test in claim_rows(CLAIMS.read_text()):
        source = SOURCE.search(claim)
        if source is None:
            bad.append(f"no `file:line` in {claim!r}")
            continue
        path, line = source.group(1), int(source.group(2))
        if not (ROOT / path).is_file():
            bad.append(f"{path} does not exist")
        elif not 1 <= line <= len((ROOT / path).read_text().splitlines()):
            bad.append(f"{path}:{line} is past the end of the file")
        if not reference:
            bad.append(f"no reference for {claim!r}")
        if not NODE.search(test) and not test.startswith("—"):
            bad.append(f"neither a test nor '— reason' for {claim!r}")
    assert not bad, "docs/claims.md: " + "; ".join(bad)


def test_a_missing_test_is_reported(tmp_path):
    """The checks above can fail: a made-up test name is not found by the ast reader."""
    text = "| `README.md:1` x | y | `tests/test_claims.py::test_that_does_not_exist` |\n"
    ((_, _, test),) = claim_rows(text)
    ((path, name),) = NODE.findall(test)
    assert name not in defined_tests(path)
    assert "test_every_listed_test_exists" in defined_tests(path)


def test_pending_tests_are_still_missing():
    """A pending test that now exists must leave PENDING, so that it is checked like every other."""
    arrived = [node for node in PENDING if node.split("::")[1] in defined_tests(node.split("::")[0])]
    assert not arrived, f"take these out of tests/test_claims.py's PENDING: {arrived}"
