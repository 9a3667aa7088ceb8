"""The import-layer contract: imports point down (ops -> core -> lora/merge -> interpolation -> analysis ->
callbacks -> cli), and no module imports another module's private name.

Every ``import`` of every module under robustft/ is read with ``ast`` (top-level, inside functions and
under ``if TYPE_CHECKING:``) and must name a module of the same or a lower layer. The layers and the
reasons are in docs/architecture.md; a new file gets its layer here.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "robustft"

#: lowest first; a module may import its own layer and the ones before it
LAYERS = ["init", "ops", "core", "lora/merge", "interpolation", "analysis", "callbacks", "cli"]

#: the layer of each module named here ...
MODULE_LAYERS = {
    # the package __init__ files only name their exports; each is imported lazily (robustft/_lazy.py)
    "robustft": "init",
    "robustft._lazy": "init",
    "robustft.checks": "init",  # bounded reprs and option checks for error messages; standard library only
    "robustft.callbacks": "init",
    "robustft.core": "init",
    "robustft.lora": "init",
    "robustft.merge": "init",
    "robustft.interpolation": "init",
    "robustft.analysis": "init",
    "robustft.demos": "init",
    # ops/__init__ defines the Reduce type the maths takes, so it is part of ops
    "robustft.ops": "ops",
    "robustft.cli": "cli",
    "robustft.__main__": "cli",
    "robustft.analysis.cli": "cli",
    "robustft.merge.cli": "cli",
    "robustft.lora.cli": "cli",
    "robustft.interpolation.cli": "cli",
}
#: ... and of every other module inside these packages (one folder, one layer; command modules above)
PACKAGE_LAYERS = {
    "robustft.ops.": "ops",
    "robustft.core.": "core",
    "robustft.lora.": "lora/merge",
    "robustft.merge.": "lora/merge",
    "robustft.interpolation.": "interpolation",
    "robustft.analysis.": "analysis",
    "robustft.callbacks.": "callbacks",
    "robustft.demos.": "cli",
}

#: ops/ is pure tensor maths: besides the standard library it may import only these
OPS_THIRD_PARTY = {"torch"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def layer_of(module: str) -> str:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    for prefix, layer in PACKAGE_LAYERS.items():
        if module.startswith(prefix):
            return layer
    where = module_path(module)
    shown = where.relative_to(ROOT) if where else f"{module.replace('.', '/')}.py"
    raise LookupError(f"assign a layer to {shown} in tests/test_layers.py (MODULE_LAYERS)")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def lazy_names(package: str) -> dict[str, str]:
    """A lazy package's exports, name -> module, read from its ``if TYPE_CHECKING:`` imports."""
    path = module_path(package)
    if path is None or path.name != "__init__.py":
        return {}
    names = {}
    for node in ast.parse(path.read_text()).body:
        if _is_type_checking(node):
            for child in node.body:
                if isinstance(child, ast.ImportFrom):
                    for a in child.names:  # a star import re-exports that package's lazy names
                        names.update({n: child.module for n in lazy_names(child.module)} if a.name == "*"
                                     else {a.asname or a.name: child.module})
    return names


def target(package: str, name: str) -> str:
    """The module ``from package import name`` really loads: a submodule, or where a lazy name lives."""
    if module_path(f"{package}.{name}"):
        return f"{package}.{name}"
    home = lazy_names(package).get(name)
    return target(home, name) if home else package


def imports_of(module: str, source: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, wherever it is."""
    tree = ast.parse(source)
    skip: set[int] = set()
    if module_path(module) and module_path(module).name == "__init__.py":
        # a package's TYPE_CHECKING imports are its list of lazy exports, not a dependency
        for node in tree.body:
            if _is_type_checking(node):
                skip |= {id(n) for n in ast.walk(node)}
    found = []
    package = module if module_path(module) and module_path(module).name == "__init__.py" else (
        module.rpartition(".")[0])
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base == "robustft" or base.startswith("robustft."):
                found += [(node.lineno, target(base, alias.name)) for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def violations(module: str, source: str) -> list[str]:
    """What in ``source`` (the text of ``module``) breaks the contract, one message per import."""
    layer = LAYERS.index(layer_of(module))
    path = module_path(module)
    where = path.relative_to(ROOT) if path else f"{module.replace('.', '/')}.py"
    found = []
    for line, imported in imports_of(module, source):
        top = imported.split(".")[0]
        if top == "robustft":
            if module_path(imported) is None:
                found.append(f"{where}:{line} imports {imported}, which is not a module of robustft")
                continue
            other = layer_of(imported)
            if LAYERS.index(other) > layer:
                found.append(
                    f"{where}:{line} imports {imported} ({other}) from the lower layer {LAYERS[layer]}: "
                    f"imports point down ({' -> '.join(LAYERS)}); move the code to its layer"
                )
        elif LAYERS[layer] == "ops" and top not in sys.stdlib_module_names and top not in OPS_THIRD_PARTY:
            found.append(f"{where}:{line} imports {imported}: ops/ is pure maths (standard library + torch)")
    return found


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = []
    for module in MODULES:
        try:
            layer_of(module)
        except LookupError as err:
            unknown.append(str(err))
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down(module):
    problems = violations(module, module_path(module).read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("robustft.ops.merge", "def f():\n    from robustft.callbacks import EMACallback\n",
         "robustft/ops/merge.py:2 imports robustft.callbacks.averaging (callbacks) from the lower layer ops"),
        ("robustft.core.params", "from robustft import SAMCallback\n", "(callbacks) from the lower layer"),
        ("robustft.interpolation.dawin", "from robustft.analysis import sharpness\n", "(analysis) from the"),
        ("robustft.core.model", "from robustft.merge.io import GramFile\n", "(lora/merge) from the lower"),
        ("robustft.merge.engine", "import robustft.cli\n", "imports robustft.cli (cli)"),
        ("robustft.lora.io", "from robustft.demos import encoder\n", "imports robustft.demos.encoder (cli)"),
        ("robustft.ops.perturb", "import numpy as np\n", "imports numpy: ops/ is pure maths"),
        ("robustft.interpolation.dawin", "from robustft.nowhere import x\n", "robustft.nowhere, which is"),
    ],
)
def test_the_contract_catches_an_upward_import(module, source, message):
    """A function-level import, a lazy name of the package and a submodule import are all seen."""
    assert any(message in problem for problem in violations(module, source)), violations(module, source)


def test_same_and_lower_layers_are_allowed():
    source = "from robustft.core import distributed\nfrom robustft.ops import interpolate\nimport torch\n"
    assert violations("robustft.callbacks.averaging", source) == []
    assert violations("robustft.merge.io", "from robustft.lora.algebra import LoRADelta\n") == []


def test_a_new_module_must_be_given_a_layer():
    expected = r"assign a layer to robustft/new_module\.py in tests/test_layers\.py"
    with pytest.raises(LookupError, match=expected):
        layer_of("robustft.new_module")


def private_imports(module: str, source: str) -> list[str]:
    """``from robustft.x import _name`` (a private name of another module) and ``import robustft.x._y``."""
    path = module_path(module)
    where = path.relative_to(ROOT) if path else f"{module.replace('.', '/')}.py"
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustft") and not node.level:
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and (
                        module_path(f"{node.module}.{alias.name}") is None):
                    name = f"{node.module}.{alias.name}"
                    found.append(f"{where}:{node.lineno} imports the private name {name}: "
                                 "make it public in one home")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_no_module_imports_a_private_name(module):
    """Helpers used in two places are public in one home (no per-file exceptions)."""
    problems = private_imports(module, module_path(module).read_text())
    assert not problems, "\n".join(problems)


def test_the_private_name_check_catches_a_reach_in():
    source = "from robustft.core.model import minimise\nfrom robustft.interpolation.learned import _x\n"
    assert private_imports("robustft.analysis.sharpness", source) == [
        "robustft/analysis/sharpness.py:2 imports the private name robustft.interpolation.learned._x: "
        "make it public in one home"
    ]
    # a private *module* (robustft._lazy) is package plumbing, not another module's private name
    assert private_imports("robustft.callbacks", "from robustft import _lazy\n") == []
