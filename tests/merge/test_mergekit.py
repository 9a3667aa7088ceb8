"""robustft's merges against mergekit (a peer library) run in the test on the same tiny local models.

The recipes are the same YAML for both tools where the formats agree (linear, task arithmetic, TIES,
Model Stock, SLERP). DARE draws its masks from a different random stream in each tool, so no fixed seed
can make them equal; for DARE-TIES we check instead that every element mergekit produced is one of the
values robustft's formula gives for *some* keep/drop pattern of the three models, and that both tools
zero the same fraction of elements (binomial tolerance).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.ops import merge as M
from tests.merge.tiny_models import build_family, load_all

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    return build_family(root, n=3, tokenizer=False)


def _options(seed=None):
    return MergeOptions(
        copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed, lazy_unpickle=True
    )


def _run_both(recipe: dict, tmp_path, seed: int = 0):
    mk_out, rf_out = tmp_path / "mergekit", tmp_path / "robustft"
    run_merge(
        MergeConfiguration.model_validate(recipe),
        str(mk_out),
        _options(seed),
    )
    ours = {k: v for k, v in recipe.items() if k != "parameters"}
    ours["parameters"] = {
        k: v for k, v in recipe.get("parameters", {}).items() if k not in ("normalize", "rescale")
    }
    merge_checkpoints(parse_recipe(ours), rf_out, progress=False)
    return load_all(mk_out), load_all(rf_out)


def _assert_same(mk, rf, atol=2e-6, tie_fraction=0.0):
    assert set(mk) == set(rf)
    for name in rf:
        close = torch.isclose(rf[name], mk[name].to(rf[name].dtype), rtol=1e-5, atol=atol)
        assert (~close).float().mean() <= tie_fraction, name


def _models(dirs, params):
    return [{"model": str(d), "parameters": p} for d, p in zip(dirs, params, strict=True)]


def test_linear_matches_mergekit(models, tmp_path):
    base, dirs = models
    weights = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]
    recipe = {"merge_method": "linear", "models": _models(dirs, weights), "dtype": "float32"}
    _assert_same(*_run_both(recipe, tmp_path))


def test_task_arithmetic_matches_mergekit(models, tmp_path):
    base, dirs = models
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": _models(dirs, [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.7}]),
              "parameters": {"lambda": 0.8}, "dtype": "float32"}  # fmt: skip
    _assert_same(*_run_both(recipe, tmp_path))


def test_ties_matches_mergekit(models, tmp_path):
    """Same elected signs except exact-zero sums (tie rule +1 in both), so all elements agree here."""
    base, dirs = models
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": _models(dirs, [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5},
                                       {"weight": 1.3, "density": 0.2}]),
              "parameters": {"lambda": 1.0}, "dtype": "float32"}  # fmt: skip
    _assert_same(*_run_both(recipe, tmp_path), tie_fraction=1e-4)


def test_model_stock_and_slerp_match_mergekit(models, tmp_path):
    base, dirs = models
    recipe = {"merge_method": "model_stock", "base_model": str(base), "models": _models(dirs, [{}, {}, {}]),
              "dtype": "float32"}  # fmt: skip
    _assert_same(*_run_both(recipe, tmp_path / "ms"))
    mk_slerp = {"merge_method": "slerp", "base_model": str(base),
                "models": _models([base, dirs[0]], [{}, {}]),
                "parameters": {"t": 0.3}, "dtype": "float32"}  # fmt: skip
    mk_out = tmp_path / "slerp_mk"
    run_merge(MergeConfiguration.model_validate(mk_slerp), str(mk_out),
              _options())  # fmt: skip
    ours = {**mk_slerp, "models": _models(dirs[:1], [{}])}  # we list only the non-base model
    merge_checkpoints(parse_recipe(ours), tmp_path / "slerp_rf", progress=False)
    _assert_same(load_all(mk_out), load_all(tmp_path / "slerp_rf"), atol=1e-5)


def test_dare_ties_agrees_with_mergekit_in_support_and_drop_rate(models, tmp_path):
    base_dir, dirs = models
    keep = 0.6
    recipe = {"merge_method": "dare_ties", "base_model": str(base_dir),
              "models": _models(dirs, [{"density": keep, "weight": 1.0}] * 3),
              "parameters": {"normalize": True, "rescale": False}, "dtype": "float32"}  # fmt: skip
    mk_out = tmp_path / "mk"
    run_merge(MergeConfiguration.model_validate(recipe), str(mk_out),
              _options(seed=0))  # fmt: skip
    mk = load_all(mk_out)
    ours_recipe = {"merge_method": "dare_ties", "base_model": str(base_dir), "models": [str(d) for d in dirs],
                   "parameters": {"drop_rate": 1 - keep, "density": 1.0}, "dtype": "float32",
                   "seed": 0}  # fmt: skip
    merge_checkpoints(parse_recipe(ours_recipe), tmp_path / "rf", progress=False)
    rf = load_all(tmp_path / "rf")
    base, fts = load_all(base_dir), [load_all(d) for d in dirs]
    zeros_mk = zeros_rf = total = 0
    for name, b in base.items():
        deltas = [ft[name] - b for ft in fts]
        # robustft's formula for every keep/drop pattern; mergekit (rescale off) = ours * (1 - p)
        candidates = torch.stack(
            [
                M.ties([d * m for d, m in zip(deltas, pattern, strict=True)], 1.0)
                for pattern in itertools.product([0.0, 1.0], repeat=3)
            ]
        )
        mk_delta = (mk[name] - b).unsqueeze(0)
        hit = torch.isclose(candidates, mk_delta, rtol=1e-4, atol=1e-6).any(dim=0)
        assert bool(hit.all()), f"{name}: {int((~hit).sum())} mergekit values outside robustft's support"
        zeros_mk += int((mk[name] == b).sum())
        zeros_rf += int((rf[name] == b).sum())
        total += b.numel()
    # P(an element keeps nothing that agrees) = sum over patterns; both tools estimate the same rate
    rate_mk, rate_rf = zeros_mk / total, zeros_rf / total
    sigma = (rate_rf * (1 - rate_rf) / total) ** 0.5
    assert abs(rate_mk - rate_rf) < 6 * sigma + 1e-3, (rate_mk, rate_rf)
    assert abs(rate_rf - (1 - keep) ** 3) < 6 * sigma + 1e-3  # all three dropped


# -- spherical merges: the same YAML for both tools, on sharded checkpoints --------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_sharded")
    return build_family(root, n=3, max_shard_size="20KB", tokenizer=False)


SPHERICAL = {
    "nuslerp": (True, [{"weight": 1.0}, {"weight": 3.0}], {}),
    "nuslerp_row_wise": (True, [{"weight": 2.0}, {"weight": 1.0}],
                         {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp_no_base": (False, [{"weight": 1.0}, {"weight": 1.0}], {}),
    "multislerp": (True, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}], {}),
    "multislerp_no_base": (False, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}],
                           {"normalize_weights": True}),
    "karcher": (False, [{}, {}, {}], {"max_iter": 10, "tol": 1e-5}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SPHERICAL))
def test_spherical_merges_match_mergekit(sharded, tmp_path, case):
    """mergekit computes in float32 (task vectors, norms, sums), robustft's spherical maths in float64 rounded
    once to float32: the outputs agree to float32 rounding, not bit for bit (measured max |diff| 2.4e-7
    for karcher, 1.2e-7 for the others, on weights of magnitude up to ~1)."""
    base, dirs = sharded
    with_base, params, gparams = SPHERICAL[case]
    assert len(list(base.glob("*.safetensors"))) > 1  # really sharded
    recipe = {"merge_method": case.split("_")[0], "models": _models(dirs[: len(params)], params),
              "parameters": gparams, "dtype": "float32"}  # fmt: skip
    if with_base:
        recipe["base_model"] = str(base)
    mk, rf = _run_both(recipe, tmp_path)
    _assert_same(mk, rf, atol=1e-6)


def test_warp_of_two_policies_matches_mergekit_nuslerp(sharded, tmp_path):
    """WARP's SLERP of two task vectors is mergekit's nuslerp with a base (no mergekit method iterates it)."""
    base, dirs = sharded
    models = _models(dirs[:2], [{"weight": 1.0}, {"weight": 2.0}])
    recipe = {"merge_method": "nuslerp", "base_model": str(base), "models": models, "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), _options())
    merge_checkpoints(parse_recipe({**recipe, "merge_method": "warp"}), tmp_path / "rf", progress=False)
    _assert_same(load_all(tmp_path / "mk"), load_all(tmp_path / "rf"), atol=1e-6)
