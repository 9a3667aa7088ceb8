"""tests/ mirrors the package: robustft/<folder>/<module>.py is tested in tests/<folder>/test_<module>.py.

Launch scripts and the tests that start processes live in tests/distributed/; shared fixtures in conftest.py
files and helper modules (no test module imports another one's fixtures).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _modules() -> list[str]:
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "robustft").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py", "_lazy.py")
    )


def test_every_module_has_its_test_file():
    missing = []
    for module in _modules():
        path = Path(module)
        test = ROOT / "tests" / Path(*path.parts[1:-1]) / f"test_{path.stem}.py"
        if not test.is_file():
            missing.append(f"{module}: add {test.relative_to(ROOT)}")
    assert not missing, "\n".join(missing)


def test_no_test_module_imports_another_test_module():
    """Shared fixtures and data live in conftest.py or a helper module, not in a test_*.py."""
    offenders = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith("tests.") and (
                    words[1].rsplit(".", 1)[-1].startswith("test_")):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_launch_scripts_live_in_tests_distributed():
    tests = ROOT / "tests"
    scripts = [*tests.rglob("*_run.py"), *tests.rglob("*script*.py")]
    assert scripts and all(p.parent.name == "distributed" for p in scripts), scripts


def test_launch_tests_live_beside_their_scripts():
    """A test that starts processes with the harness's torchrun lives in tests/distributed/ too."""
    launchers = [p for p in (ROOT / "tests").rglob("test_*.py")
                 if p.name != "test_mirror.py" and "torchrun(" in p.read_text()]
    assert launchers and all(p.parent.name == "distributed" for p in launchers), launchers


def test_the_adding_a_method_sections_name_real_files():
    """docs/architecture.md's "Adding a merge method" / "Adding a callback" steps name files that exist."""
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    steps = text[text.index("## Adding a merge method"):text.index("## Tests: fast subset and CI")]
    paths = set(re.findall(r"`((?:robustft|tests)/[\w/]+\.py)", steps))
    wanted = {"robustft/merge/registry.py", "robustft/callbacks/__init__.py",
              "tests/callbacks/test_options.py"}
    assert wanted <= paths
    assert [p for p in paths if not (ROOT / p).is_file()] == []
