"""Loading single files of an unpacked fusion-bench wheel (``FUSION_BENCH_DIR``) with its package stubbed:
shared by the FusionBench parity tests of merge/ and interpolation/ (WEMoE)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
import typing
from pathlib import Path

ROOT = os.environ.get("FUSION_BENCH_DIR")


def exec_file(name: str, relative: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(ROOT) / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_module(
    name: str, relative: str, extra: dict[str, dict] | None = None, needs: tuple[tuple[str, str], ...] = ()
):
    """The wheel's file ``relative`` as module ``name``, the package stubbed. ``extra``: more stub modules,
    name -> attributes (a stub named like ``name``'s package makes relative imports work); ``needs``: (module
    name, file) of the wheel's modules it imports, loaded first (e.g. ``fusion_bench.models.utils`` for
    ``models/we_moe.py``)."""
    stubs = {
        "fusion_bench": types.ModuleType("fusion_bench"),
        "fusion_bench.utils": types.ModuleType("fusion_bench.utils"),
        "fusion_bench.utils.type": types.ModuleType("fusion_bench.utils.type"),
        "fusion_bench.utils.dict": types.ModuleType("fusion_bench.utils.dict"),
        "fusion_bench.models": types.ModuleType("fusion_bench.models"),
    }
    for package in ("fusion_bench", "fusion_bench.utils", "fusion_bench.models"):
        stubs[package].__path__ = []
    stubs["fusion_bench.utils"].timeit_context = lambda *a, **k: contextlib.nullcontext()
    stubs["fusion_bench.utils.type"].StateDictType = dict
    stubs["fusion_bench.utils.type"].TorchModelType = typing.TypeVar("TorchModelType")
    stubs["fusion_bench.utils.dict"].dict_merge = None
    for module, attributes in (extra or {}).items():
        stubs[module] = types.ModuleType(module)
        stubs[module].__dict__.update(attributes)
    saved = {k: sys.modules.get(k) for k in [*stubs, *(n for n, _ in needs)]}
    sys.modules.update(stubs)
    try:
        for dep, dep_relative in needs:
            sys.modules[dep] = exec_file(dep, dep_relative)
        module = exec_file(name, relative)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        if "." in name:  # a sibling module its relative import loaded
            sys.modules.pop(name.rpartition(".")[0] + ".utils", None)
    return module
