"""docs/claims.md cannot rot: every row's quoted words still stand in the file it names (a reworded or removed
claim fails here and gets reviewed), every test it names exists (found by ast, no import), and every row names
a test or says why it has none."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "docs" / "claims.md"
NODE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
#: a claim cell: `path` "a verbatim quote of the claim's sentence" (\| for a | inside the quote)
SOURCE = re.compile(r'^`([\w/.-]+\.(?:md|py))` "(.+)"$')
#: markup dropped at the start of a line before comparing: comment marks, quote marks, list stars
LEAD = re.compile(r"^\s*(?:#+:?|>+|\*(?=\s))?\s*")


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


def normalised(text: str) -> str:
    """``text`` without each line's leading ``#``/``>``/``*`` markup, whitespace collapsed: a quote
    then matches its sentence however the sentence wraps."""
    return " ".join(" ".join(LEAD.sub("", line) for line in text.splitlines()).split())


@cache
def normalised_file(path: str) -> str:
    """The normalised text of ``path`` (relative to the repository root)."""
    return normalised((ROOT / path).read_text())


def quote_problem(claim: str) -> str | None:
    """Why the claim cell does not locate its sentence (no `path` "quote", no such file, quote not in it),
    or None."""
    source = SOURCE.match(claim)
    if source is None:
        return f'no `path` "quote" in {claim!r}'
    path, quote = source.group(1), normalised(source.group(2).replace("\\|", "|"))
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    if len(quote.split()) < 4:
        return f"the quote {quote!r} is too short to locate a sentence in {path} (4 words at least)"
    if quote not in normalised_file(path):
        return f"{path} no longer says {quote!r} (claim reworded or removed: review the row)"
    return None


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
            if not (ROOT / path).is_file() or name not in defined_tests(path):
                missing.append(f"{path}::{name}")
    assert not missing, f"docs/claims.md names tests that do not exist: {missing}"


def test_every_row_quotes_its_file_verbatim_and_has_a_test_or_a_reason():
    bad = []
    for claim, reference, test in claim_rows(CLAIMS.read_text()):
        problem = quote_problem(claim)
        if problem:
            bad.append(problem)
        if not reference:
            bad.append(f"no reference for {claim!r}")
        if not NODE.search(test) and not test.startswith("—"):
            bad.append(f"neither a test nor '— reason' for {claim!r}")
    assert not bad, "docs/claims.md: " + "; ".join(bad)


def test_a_reworded_claim_is_reported():
    """The quote check can fail: a quote that wraps and carries markup matches, a changed word does not."""
    claim = '`tests/test_claims.py` "quote check can fail: a quote that wraps"'
    assert quote_problem(claim) is None
    assert "no longer says" in quote_problem(claim.replace("can fail", "cannot fail"))
    assert "does not exist" in quote_problem(claim.replace("test_claims.py", "test_nothing.py"))
    assert "no `path`" in quote_problem("`tests/test_claims.py:12` the old form")
    assert normalised("  # one\n  #: two  >\n> three\n * four") == "one two > three four"


def test_a_missing_test_is_reported(tmp_path):
    """The checks above can fail: a made-up test name is not found by the ast reader."""
    text = '| `README.md` "any four words here" | y | `tests/test_claims.py::test_that_does_not_exist` |\n'
    ((_, _, test),) = claim_rows(text)
    ((path, name),) = NODE.findall(test)
    assert name not in defined_tests(path)
    assert "test_every_listed_test_exists" in defined_tests(path)
