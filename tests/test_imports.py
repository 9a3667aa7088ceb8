"""What an import costs: the maths and the CLI do not pull in the Trainer stack, and lazy names resolve.

Each case runs in a fresh interpreter and reads ``sys.modules`` after the import, so what the test
process itself has imported does not matter. Every module of the package is covered (new ones too):
only the callbacks and the zero-shot model may import transformers and friends.
"""

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import robustft

ROOT = Path(__file__).resolve().parents[1]

#: the Trainer stack and other heavy optional libraries; none of them is needed by the maths or the CLI
HEAVY = ("transformers", "peft", "accelerate", "datasets", "trl", "deepspeed", "matplotlib")

#: modules that sit on the Trainer stack by design (the callbacks layer and the zero-shot model)
MAY_BE_HEAVY = ("robustft.callbacks.", "robustft.demos.zero_shot")

#: packages and command modules that must not even import torch (the CLI parser is built from them)
TORCH_FREE = (
    "robustft",
    "robustft.callbacks",
    "robustft.lora",
    "robustft.merge",
    "robustft.core",
    "robustft.interpolation",
    "robustft.analysis",
    "robustft.demos",
    "robustft.analysis.cli",
    "robustft.cli",
    "robustft.demos.cli",
    "robustft.demos.encoder",
    "robustft.lora.cli",
    "robustft.merge.cli",
)

PACKAGES = ("robustft", "robustft.callbacks", "robustft.lora", "robustft.merge")

# Imports the given modules one after another and prints, per module, the watched top-level modules
# that its import added to sys.modules.
PROBE = """
import importlib, json, sys
watched = set(json.loads(sys.argv[1]))
loaded, added = set(), {}
for name in sys.argv[2:]:
    importlib.import_module(name)
    now = {m.split(".")[0] for m in sys.modules} & watched
    added[name] = sorted(now - loaded)
    loaded |= now
print(json.dumps(added))
"""

# Runs ``python -m robustft ARGS`` in-process and, at exit, prints which watched modules were imported.
CLI_PROBE = """
import atexit, json, runpy, sys
watched = set(json.loads(sys.argv[1]))
atexit.register(lambda: print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & watched)),
                              file=sys.stderr))
sys.argv = ["robustft", *sys.argv[2:]]
runpy.run_module("robustft", run_name="__main__", alter_sys=True)
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _added(modules: list[str], watched: tuple[str, ...]) -> dict[str, list[str]]:
    proc = _python("-c", PROBE, json.dumps(watched), *modules)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _all_modules() -> list[str]:
    """Every module of the package, found on disk (``__main__`` runs the CLI, so it is left out)."""
    found = ["robustft"]
    for info in pkgutil.walk_packages([str(ROOT / "robustft")], prefix="robustft."):
        if not info.name.endswith("__main__"):
            found.append(info.name)
    return sorted(found)


def test_packages_and_cli_modules_do_not_import_torch():
    added = _added(list(TORCH_FREE), ("torch", *HEAVY))
    assert {name: mods for name, mods in added.items() if mods} == {}


def test_maths_and_io_modules_do_not_import_the_trainer_stack():
    """ops, params, distributed, checkpoint, lora, merge, wise_ft, compat, ...: torch at most."""
    cheap = [m for m in _all_modules() if not m.startswith(MAY_BE_HEAVY)]
    assert {"robustft.ops.merge", "robustft.merge.engine", "robustft.lora.io"} <= set(cheap)
    added = _added(cheap, ("torch", *HEAVY))
    assert any(mods == ["torch"] for mods in added.values())  # the probe does see what a module imports
    assert {name: mods for name, mods in added.items() if set(mods) - {"torch"}} == {}


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], ["merge", "--help"], ["lora", "--help"], ["lora", "add", "--help"],
     ["interpolate", "--help"], ["demo", "--help"], ["search", "--help"], ["soup", "--help"],
     ["report", "--help"]],
    ids=" ".join,
)
def test_cli_answers_without_torch(args):
    proc = _python("-c", CLI_PROBE, json.dumps(("torch", *HEAVY)), *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"robustft {robustft.__version__}" if args == ["--version"] else "usage:")
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert set(module.__all__) <= set(dir(module))
    namespace: dict = {}
    exec(f"from {package} import *", namespace)
    assert set(module.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize("package", PACKAGES)
def test_type_checking_imports_match_the_lazy_names(package):
    """The ``if TYPE_CHECKING:`` imports (what IDEs see) name the same objects the lazy look-up returns."""
    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom), ast.unparse(node)
        source = importlib.import_module(node.module)
        for alias in node.names:
            if alias.name == "*":  # robustft's callbacks: the names robustft.callbacks.CALLBACKS lists
                seen.update({name: getattr(source, name) for name in source.CALLBACKS})
            else:
                seen[alias.asname or alias.name] = getattr(source, alias.name)
    assert set(seen) == set(module.__all__) - {"__version__"}
    for name, obj in seen.items():
        assert getattr(module, name) is obj, f"{package}.{name}"


def test_submodules_still_import_through_the_package():
    """``from robustft.core import distributed`` (a module, not a lazy name) keeps working."""
    from robustft.core import distributed, params

    assert distributed.__name__ == "robustft.core.distributed" and params.__name__ == "robustft.core.params"


#: the public names of ``from robustft import X`` (issue 23: the layout moved, these did not)
PUBLIC = {
    "AlphaBudget",
    "BEMACallback", "ContinualBackpropCallback",
    "DeltaSet", "EMACallback", "EMAReferenceCallback", "EWCCallback",
    "ForgettingCallback",
    "L2SPCallback",
    "LAWACallback", "LPFTCallback", "LearnedInterpolation", "LoRAAdapter", "LoRAArithmeticCallback",
    "LoRADelta", "MGPOCallback",
    "MomentumInterpolationCallback", "MomentumSAMCallback", "RandomPerturbationCallback", "SAMCallback",
    "SWACallback", "SentenceClassifier", "SharpnessReport", "ShrinkPerturbCallback", "Snapshot",
    "StrengthCurve",
    "SoupCallback", "SoupResult", "soup_model", "trainer_scorer", "write_uniform_soup",
    "SpectralRegCallback", "SparseUpdateCallback", "WassersteinRegCallback", "WiseFTCallback",
    "WiseFTCurve", "__version__",
    "compose_adapters", "dawin_evaluate", "estimate_fisher", "evaluate_at_alphas", "fit_wemoe",
    "install_zero_shot_head", "interpolate", "interpolate_models", "interpolate_state_dicts",
    "layer_sharpness",
    "RetentionScores", "RetentionSet", "build_retention_set", "general_prompts", "score_retention",
    "least_critical_module", "load_recipe", "load_wemoe", "merge_checkpoints", "merge_into_base",
    "module_criticality", "plot_sharpness", "read_adapter", "save_wemoe", "select_parameters",
    "sharpness_along_path", "swapped_in", "upscale_wemoe", "wise_ft_sweep", "write_adapter",
    "search_merge",
    "BarrierReport", "barrier_report", "straggler_layers", "treat_stragglers",  # issue 27
    "strength_sweep",
}


def test_the_public_names_are_kept():
    """Every public name still imports from ``robustft``; a new one is added here on purpose."""
    assert set(robustft.__all__) == PUBLIC


def test_the_top_level_callbacks_come_from_the_one_table():
    """A callback is registered once (robustft.callbacks.EXPORTS); robustft re-exports every callback."""
    import robustft.callbacks as callbacks

    classes = {n for n in callbacks.__all__ if n.endswith("Callback")} - {"RobustCallback"}
    assert set(callbacks.CALLBACKS) == classes
    assert set(callbacks.CALLBACKS) <= set(robustft.__all__)
