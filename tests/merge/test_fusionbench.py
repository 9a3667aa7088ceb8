"""TSV-M, Iso-C and Iso-CTS against FusionBench's own functions on the same tensors.

fusion-bench is not installable next to robustft's test environment without pulling hydra-core, lightning,
tensorboard, h5py and more, so this test loads the two files that hold the maths
(``method/task_singular_vector/utils/TSVM_utils.py``, ``method/isotropic_merging/iso_utils.py``) from an
unpacked wheel, with the package's ``__init__`` stubbed. Run it with::

    pip download --no-deps fusion-bench -d /tmp/fb && unzip -q /tmp/fb/fusion_bench-*.whl -d /tmp/fb/whl
    FUSION_BENCH_DIR=/tmp/fb/whl/fusion_bench python -m pytest -q tests/merge/test_fusionbench.py

Measured with fusion-bench 0.2.33 (float64): largest relative difference 2.2e-15 (tsv_m, iso_c) and 4.5e-14
(iso_cts); FusionBench's iso_cts raises where its rounding of the task-specific size overshoots the rank
(r = 9, T = 5, common_space_fraction = 0.2), robustft caps it (``iso_cts_sizes``).

The loader ``_load`` is also used by ``tests/test_wemoe_api.py`` (FusionBench's ``models/we_moe.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from robustft.ops import merge as M

ROOT = os.environ.get("FUSION_BENCH_DIR")
pytestmark = pytest.mark.skipif(not ROOT, reason="FUSION_BENCH_DIR (an unpacked fusion-bench wheel) not set")


def _exec(name: str, relative: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(ROOT) / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(name: str, relative: str, needs: tuple[tuple[str, str], ...] = ()):
    """The wheel's file ``relative`` as a module, the package stubbed; ``needs``: (module name, file) of the
    wheel's modules it imports, loaded first (e.g. ``fusion_bench.models.utils`` for ``models/we_moe.py``)."""
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
    saved = {k: sys.modules.get(k) for k in [*stubs, *(n for n, _ in needs)]}
    sys.modules.update(stubs)
    try:
        for dep, dep_relative in needs:
            sys.modules[dep] = _exec(dep, dep_relative)
        module = _exec(name, relative)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(16, 12), (12, 16), (24, 24), (40, 10), (7,), (5, 3, 2)])
def test_svd_merges_equal_fusionbench(n, shape):
    tsv = _load("fb_tsvm_utils", "method/task_singular_vector/utils/TSVM_utils.py")
    iso = _load("fb_iso_utils", "method/isotropic_merging/iso_utils.py")
    g = torch.Generator().manual_seed(n)
    deltas = [torch.randn(shape, generator=g, dtype=torch.float64) * (1 + i) for i in range(n)]
    sds = [{"w": d.clone()} for d in deltas]
    with contextlib.redirect_stdout(None):
        pairs = [
            (M.tsv_merge(deltas), tsv.compute_and_sum_svd_mem_reduction(sds, accelerator="cpu")["w"]),
            (M.iso_c(deltas), iso.iso_c(sds, accelerator="cpu")["w"]),
            *[(M.iso_cts(deltas, f), iso.iso_cts(sds, f, accelerator="cpu")["w"]) for f in (0.8, 0.5, 0.2)],
        ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
