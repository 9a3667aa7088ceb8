"""robustft's merges against mergekit (a peer library) run in the test on the same tiny local models.

The recipes are the same YAML for both tools where the formats agree (linear, task arithmetic, TIES,
Model Stock, SLERP, DELLA, SCE, RAM, NearSwap, Arcee Fusion; Breadcrumbs-TIES names its fractions
differently, see its test). DARE draws its masks from a different random stream in each tool, so no fixed seed
can make them equal; for DARE-TIES we check instead that every element mergekit produced is one of the
values robustft's formula gives for *some* keep/drop pattern of the three models, and that both tools
zero the same fraction of elements (binomial tolerance).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.ops import merge as M
from tests.merge.tiny_models import build_family, load_all, tiny_config

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
    ours_recipe = {**recipe, "seed": 0}  # the same YAML: density is the keep probability in both tools
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


# -- methods of mergekit 0.1.5 (issue 16), on sharded inputs (the ``family`` fixture: 40 KB shards) ---------
def _run_pair(mk_recipe: dict, rf_recipe: dict, tmp_path, seed: int = 0):
    """mergekit on its recipe, robustft on its own (the parameter names differ only where stated)."""
    run_merge(MergeConfiguration.model_validate(mk_recipe), str(tmp_path / "mk"), _options(seed))
    merge_checkpoints(parse_recipe(rf_recipe), tmp_path / "rf", progress=False)
    return load_all(tmp_path / "mk"), load_all(tmp_path / "rf")


def _max_diff(mk, rf) -> float:
    assert set(mk) == set(rf)
    diff = max(float((mk[n] - rf[n]).abs().max()) for n in rf)
    print(f"max |mergekit - robustft| = {diff:.3g}")  # shown with -s: the measured agreement
    return diff


@pytest.fixture
def no_randomness(monkeypatch):
    """DELLA with the draw removed: both tools keep exactly the entries whose keep probability exceeds 1/2
    (mergekit draws ``torch.bernoulli(p)``, robustft ``torch.rand() < p``; both become p > 1/2)."""
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (p > 0.5).to(p.dtype))
    monkeypatch.setattr(torch, "rand", lambda shape, *a, **k: torch.full(tuple(shape), 0.5))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("normalize", [True, False])
def test_della_matches_mergekit_with_the_draw_removed(family, tmp_path, method, normalize, no_randomness):
    """Same ranks, same probabilities, same L1 rescale and sign election: equal to float rounding."""
    base, dirs = family
    params = [{"weight": 1.0, "density": 0.45, "epsilon": 0.1},
              {"weight": 0.6, "density": 0.6, "epsilon": 0.2},
              {"weight": 1.3, "density": 0.35, "epsilon": 0.15}]  # fmt: skip
    recipe = {"merge_method": method, "base_model": str(base), "models": _models(dirs, params),
              "parameters": {"lambda": 0.9, "normalize": normalize, "rescale": True},
              "dtype": "float32"}  # fmt: skip
    mk, rf = _run_pair(recipe, recipe, tmp_path)
    assert _max_diff(mk, rf) < 2e-6
    b = load_all(base)
    assert any(not torch.equal(rf[n], b[n]) for n in b)  # something was merged


def test_della_linear_draws_agree_with_mergekit_in_distribution(family, tmp_path):
    """Real draws (different generators): every output entry is the base's or the model's (support), and the
    number of kept entries in the lower and in the upper half of each row by magnitude rank matches the sum
    of the keep probabilities p_j in both tools (a sum of Bernoullis: within 6 standard deviations)."""
    base, dirs = family
    density, eps = 0.5, 0.3
    recipe = {"merge_method": "della_linear", "base_model": str(base),
              "models": _models(dirs[:1], [{"weight": 1.0, "density": density, "epsilon": eps}]),
              "parameters": {"rescale": False}, "dtype": "float32", "seed": 0}  # fmt: skip
    mk, rf = _run_pair(recipe, recipe, tmp_path, seed=0)
    b, ft = load_all(base), load_all(dirs[0])
    counts = {"mk": [0, 0], "rf": [0, 0]}
    mean, var = [0.0, 0.0], [0.0, 0.0]
    for name, t in b.items():
        delta = ft[name] - t
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        rank = rows.abs().argsort(dim=1).argsort(dim=1).double()
        p = density - eps + 2 * eps * rank / (rows.shape[1] - 1)
        upper = rank >= rows.shape[1] / 2
        for half, where in enumerate([~upper, upper]):
            mean[half] += float(p[where].sum())
            var[half] += float((p * (1 - p))[where].sum())
        for who, out in (("mk", mk), ("rf", rf)):
            kept = out[name] == ft[name]
            assert bool((kept | (out[name] == t)).all()), (who, name)
            kept = kept.reshape(rows.shape)
            counts[who][0] += int(kept[~upper].sum())
            counts[who][1] += int(kept[upper].sum())
    for half in (0, 1):
        for who in ("mk", "rf"):
            z = (counts[who][half] - mean[half]) / var[half] ** 0.5
            print(f"{who} keeps {counts[who][half]} of the {'upper' if half else 'lower'} half, "
                  f"expected {mean[half]:.0f} (z = {z:.2f})")  # fmt: skip
            assert abs(z) < 6, (who, half, counts[who][half], mean[half])


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_ties_matches_mergekit(family, tmp_path, normalize):
    """Both keep ``density`` after dropping the ``gamma`` largest (mergekit's meaning, the same YAML)."""
    base, dirs = family
    weights = [1.0, 0.6, 1.3]
    mk_recipe = {"merge_method": "breadcrumbs_ties", "base_model": str(base),
                 "models": _models(dirs, [{"weight": w, "density": 0.5, "gamma": 0.25} for w in weights]),
                 "parameters": {"lambda": 0.8, "normalize": normalize}, "dtype": "float32"}  # fmt: skip
    mk, rf = _run_pair(mk_recipe, mk_recipe, tmp_path)
    assert _max_diff(mk, rf) < 2e-6


@pytest.mark.parametrize(
    "method,parameters,n_models",
    [
        ("sce", {"select_topk": 0.5}, 3),
        ("sce", {}, 3),
        ("ram", {"epsilon": 0.02}, 3),
        ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}, 3),
        ("nearswap", {"t": 0.01}, 1),
        ("arcee_fusion", {}, 1),
    ],
)
def test_method_matches_mergekit(family, tmp_path, method, parameters, n_models):
    """Deterministic methods on the same sharded inputs: equal to float rounding (sums in another order)."""
    base, dirs = family
    rf_recipe = {"merge_method": method, "base_model": str(base),
                 "models": _models(dirs[:n_models], [{}] * n_models),
                 "parameters": parameters, "dtype": "float32"}  # fmt: skip
    mk_recipe = dict(rf_recipe)
    if n_models == 1:  # mergekit counts the base among its two inputs
        mk_recipe["models"] = _models([base, dirs[0]], [{}, {}])
    mk, rf = _run_pair(mk_recipe, rf_recipe, tmp_path)
    assert _max_diff(mk, rf) < 2e-6
    b = load_all(base)
    assert any(not torch.equal(rf[n], b[n]) for n in b)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_passthrough_matches_mergekit_bit_for_bit(sharded, tmp_path, scale):
    """passthrough: one model's tensors (times ``scale``), the same YAML for both tools, on sharded inputs."""
    _, dirs = sharded
    params = {} if scale is None else {"scale": scale}
    recipe = {"merge_method": "passthrough", "models": _models(dirs[:1], [params]), "dtype": "float32"}
    mk, rf = _run_pair(recipe, recipe, tmp_path)
    assert set(mk) == set(rf)
    for name, tensor in rf.items():
        assert torch.equal(tensor, mk[name]), name
    if scale is not None:  # the scale was applied, not the model copied
        assert not torch.equal(rf["model.norm.weight"], load_all(dirs[0])["model.norm.weight"])


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer base and 2 fine-tuned copies, sharded."""
    root = tmp_path_factory.mktemp("mk_deep")
    return build_family(root, n=2, max_shard_size="30KB", config=tiny_config(layers=4), tokenizer=False)


def test_passthrough_slices_stack_layers_as_mergekit(deep, tmp_path):
    """Layer stacking: layers 0-1 of one model then 1-3 of another, renumbered 0-4, embeddings from the first
    slice's model, norm and head from the last one's; the same YAML for both tools, bit for bit."""
    _, dirs = deep
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(dirs[1]), "layer_range": [1, 4]}]}]}  # fmt: skip
    mk, rf = _run_pair(recipe, recipe, tmp_path)
    assert set(mk) == set(rf)
    for name, tensor in rf.items():
        assert torch.equal(tensor, mk[name]), name
    a, b = load_all(dirs[0]), load_all(dirs[1])
    assert torch.equal(rf["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(rf["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(rf["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(rf["lm_head.weight"], b["lm_head.weight"])
    for out in (tmp_path / "mk", tmp_path / "rf"):
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    LlamaForCausalLM.from_pretrained(tmp_path / "rf")  # loads: names and config agree


@pytest.mark.parametrize(
    "change,match",
    [
        ({"models": ["x"]}, "takes no models"),
        ({"slices": []}, "non-empty list"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]}, "0 <= start < end"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}] * 2}]}, "at most 1 input"),
    ],
)
def test_bad_slices_name_the_option(change, match):
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}], **change}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        parse_recipe(recipe)


def test_slices_beyond_the_models_layers_are_refused_before_writing(deep, tmp_path):
    _, dirs = deep
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [2, 6]}]}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"slices\[0\].*beyond the 4 layers"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
