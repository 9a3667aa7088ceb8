"""benchmarks/layout.py: its figures against brute force on a made-up package, and a run on this repo."""

import subprocess
import sys
from pathlib import Path

from benchmarks import layout

ROOT = Path(__file__).resolve().parents[1]


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "robustft" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_figures_of_a_small_package_are_the_hand_counted_ones(tmp_path):
    tree = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from robustft import b\n",
        "b.py": "def f():\n    from robustft.sub import c\n    return c\n",
        "sub/__init__.py": "from . import c\n",
        "sub/c.py": "import robustft.d\n\n\ndef long():\n" + "    x = 1\n" * 9,
        "d.py": "from .e import g\n",
        "e.py": "from robustft.d import g\n",
    })
    got = layout.metrics(tree)
    assert got["modules"] == 7
    assert got["import cycles"] == [["robustft.d", "robustft.e"]]
    assert got["import graph depth"] == 5  # a -> b -> sub.c -> d -> e (the cycle cut once)
    assert got["largest file"] == "robustft.sub.c (13 lines)"
    assert got["longest function"] == "robustft.sub.c.long (10 lines)"


def test_runs_on_this_repository_and_compares(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/layout.py", "--compare", str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()}
    modules = len([p for p in (ROOT / "robustft").rglob("*.py")])
    assert rows["modules"].count(f" {modules} ") == 2
    assert rows["import cycles"].count(" [] ") == 2  # tests/test_layers.py keeps the imports pointing down
