"""mergekit 0.1.5's recipe grammar read as mergekit reads it, checked against mergekit run in the test on the
same tiny sharded Llama checkpoints (the same YAML for both tools): gradient lists spread over layers,
``filter:`` lists, ``slices:`` with several sources and their own parameters for every method, ``out_dtype``,
and Hub model ids through the hub cache (``chat_template``: test_chat_templates.py; the ``mergekit-yaml``
flags of ``robustft merge``: test_cli.py).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.merge.recipe import evaluate_setting, parse_setting
from robustft.merge.registry import METHODS
from tests.merge.tiny_models import (
    build_family,
    load_all,
    max_diff,
    mergekit_options,
    recipe_models,
    tiny_config,
)

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import ConditionalParameter, MergeConfiguration  # noqa: E402
from mergekit.config import evaluate_setting as mk_evaluate_setting  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402

#: the canonical filter list of mergekit's README SLERP recipe
T_FILTERS = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def _run_both(recipe: dict, tmp_path: Path, ours: dict | None = None, **options):
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), mergekit_options(**options))
    merge_checkpoints(parse_recipe(ours or recipe), tmp_path / "rf", progress=False)
    return load_all(tmp_path / "mk"), load_all(tmp_path / "rf")


# -- evaluate_setting: the same values as mergekit's for every position and tensor name ----------------------
SETTINGS = [
    0.25,
    [0, 0.5, 0.3, 0.7, 1],
    [1, 0],
    [0.2, 0.8],
    [2],
    [True, False, True],
    T_FILTERS,
    {"filter": "mlp", "value": [0.1, 0.9]},
    [{"filter": "o_proj", "value": 0}, {"filter": "*", "value": [0.5, 1]}],
    [{"filter": "down_proj", "value": 0.0}],
    [],
]
NAMES = [
    "model.layers.3.self_attn.o_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "lm_head.weight",
    "",
]


def _mergekit_setting(raw):
    if isinstance(raw, dict):
        return ConditionalParameter(**raw)
    if isinstance(raw, list) and raw and isinstance(raw[0], dict):
        return [ConditionalParameter(**c) for c in raw]
    return raw


@pytest.mark.parametrize("raw", SETTINGS, ids=range(len(SETTINGS)))
def test_evaluate_setting_is_mergekits(raw):
    """Gradients (interpolated numbers, picked booleans) and filters (substring, "*", no filter, none
    matching) evaluate to mergekit's value at every position, for every tensor name."""
    key = "normalize" if raw and isinstance(raw, list) and isinstance(raw[0], bool) else "t"
    spec = METHODS["linear"] if key == "normalize" else METHODS["slerp"]
    ours = parse_setting("p", key, raw, spec, allow_global=True)
    theirs = _mergekit_setting(raw)
    for name, t in itertools.product(NAMES, [0, 0.1, 1 / 3, 0.5, 2 / 3, 0.77, 1]):
        want = mk_evaluate_setting(name, theirs, t, validate=lambda v: v)
        got = evaluate_setting(ours, name, t)
        assert got == want and isinstance(got, bool) == isinstance(want, bool), (name, t, got, want)


# -- slices with every method ------------------------------------------------------------------------------
def test_canonical_slerp_with_gradient_filters_over_slices_matches_mergekit(deep, tmp_path):
    """mergekit's README SLERP: slices, the base listed among the sources, a filter list of gradients for t;
    the gradient is spread over each slice's layers (t = i/(n-1)), the embeddings, norm and head get t=0."""
    base, dirs = deep
    recipe = {"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 4]},
                                      {"model": str(dirs[0]), "layer_range": [0, 4]}]}],
              "parameters": {"t": T_FILTERS}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 1e-6
    # the gradient was applied: layer 3's attention is the model (t=1), its MLP the base (t=0)
    b, ft = load_all(base), load_all(dirs[0])
    assert torch.allclose(
        rf["model.layers.3.self_attn.q_proj.weight"], ft["model.layers.3.self_attn.q_proj.weight"]
    )
    assert torch.allclose(rf["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(rf[q0], b[q0])  # the gradient's first entry, 0


def test_slerp_over_two_slices_of_different_lengths_matches_mergekit(deep, tmp_path):
    """Each slice spreads the gradient over its own layers; a one-layer slice is at t = 1."""
    base, dirs = deep
    recipe = {"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]},
                                      {"model": str(dirs[1]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(base), "layer_range": [3, 4]},
                                      {"model": str(dirs[1]), "layer_range": [3, 4]}],
                          "parameters": {"t": [0.2, 0.6]}}],
              "parameters": {"t": [0.1, 0.9]}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 1e-6


def test_ties_with_per_model_gradients_matches_mergekit(deep, tmp_path):
    """TIES with gradient lists for per-model density and weight and a filtered global density (the
    models form: mergekit adds the base itself)."""
    base, dirs = deep
    params = [{"density": [0.2, 0.8], "weight": [1, 0]},
              {"density": [0.9, 0.3], "weight": 0.7},
              {"weight": [0.5, 1.5, 0.8]}]  # fmt: skip
    recipe = {"merge_method": "ties", "base_model": str(base), "models": recipe_models(dirs, params),
              "parameters": {"density": [{"filter": "mlp", "value": 0.4}, {"value": 0.6}], "lambda": 0.9},
              "dtype": "float32"}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 2e-6


def test_ties_over_slices_with_sources_own_parameters_matches_mergekit(deep, tmp_path):
    """Two slices of base + two models each; per-source gradients, slice parameters over the recipe's."""
    base, dirs = deep

    def piece(lo, hi, dens):
        return {"sources": [{"model": str(base), "layer_range": [lo, hi]},
                            {"model": str(dirs[0]), "layer_range": [lo, hi], "parameters": {"density": dens}},
                            {"model": str(dirs[2]), "layer_range": [lo, hi],
                             "parameters": {"weight": [0.3, 1.2], "density": 0.5}}]}  # fmt: skip

    second = {**piece(2, 4, 0.7), "parameters": {"weight": 0.8}}
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "slices": [piece(0, 2, [0.3, 0.9]), second],
              "parameters": {"density": 0.4, "weight": [1, 2]}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 2e-6


def test_linear_over_slices_matches_mergekit(deep, tmp_path):
    """linear ignores base_model (mergekit's "ignored" base): every source is an input, with its weight."""
    base, dirs = deep
    recipe = {"merge_method": "linear", "dtype": "float32",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2],
                                       "parameters": {"weight": [1, 3]}},
                                      {"model": str(dirs[1]), "layer_range": [2, 4]}],
                          "parameters": {"weight": 0.5}},
                         {"sources": [{"model": str(dirs[1]), "layer_range": [0, 2]},
                                      {"model": str(base), "layer_range": [1, 3],
                                       "parameters": {"weight": [{"filter": "mlp", "value": 2}]}}]}],
              "parameters": {"weight": 1.0, "normalize": True}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 1e-6


def test_slices_with_different_source_counts_match_mergekit(deep, tmp_path):
    """The final norm and head are merged from the last slice's first sources, as many as the first slice
    has (mergekit pairs them with the first slice's input weights)."""
    base, dirs = deep
    recipe = {"merge_method": "linear", "dtype": "float32",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2]},
                                      {"model": str(dirs[1]), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(dirs[2]), "layer_range": [2, 4]},
                                      {"model": str(base), "layer_range": [2, 4]},
                                      {"model": str(dirs[0]), "layer_range": [2, 4]}]}],
              "parameters": {"weight": [1, 2]}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 1e-6


def test_passthrough_frankenmerge_with_scale_filters_matches_mergekit(deep, tmp_path):
    """The frankenmerge trick: repeated layers with o_proj and down_proj scaled (here to 0 and 0.5) by a
    filter list, per source and recipe-wide; bit for bit."""
    _, dirs = deep
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": [0.5, 1]}, {"value": 1.0}]
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 3]}]},
                         {"sources": [{"model": str(dirs[1]), "layer_range": [1, 4],
                                       "parameters": {"scale": scale}}]},
                         {"sources": [{"model": str(dirs[0]), "layer_range": [3, 4]}]}],
              "parameters": {"scale": [{"filter": "input_layernorm", "value": 0.9}]}}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) == 0
    a = load_all(dirs[1])
    assert torch.equal(
        rf["model.layers.3.self_attn.o_proj.weight"],
        torch.zeros_like(a["model.layers.1.self_attn.o_proj.weight"]),
    )
    assert json.loads((tmp_path / "rf" / "config.json").read_text())["num_hidden_layers"] == 7


@pytest.fixture
def no_randomness(monkeypatch):
    """The random draws removed: both tools keep exactly the entries whose keep probability exceeds 1/2
    (mergekit ``torch.bernoulli(p)``, robustft ``torch.rand() < p``: both become p > 1/2)."""
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (p > 0.5).to(p.dtype))
    monkeypatch.setattr(torch, "rand", lambda shape, *a, **k: torch.full(tuple(shape), 0.5))


def test_della_with_per_model_gradients_matches_mergekit(deep, tmp_path, no_randomness):
    base, dirs = deep
    params = [
        {"weight": [1, 0.5], "density": [0.3, 0.7], "epsilon": 0.1},
        {"weight": 0.6, "density": 0.6, "epsilon": [0.05, 0.2]},
        {"weight": 1.3, "density": [{"filter": "mlp", "value": 0.45}, {"value": 0.55}], "epsilon": 0.15},
    ]
    recipe = {"merge_method": "della", "base_model": str(base), "models": recipe_models(dirs, params),
              "parameters": {"lambda": [1, 0.8], "normalize": True, "rescale": True},
              "dtype": "float32"}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 2e-6


DIALECT = pytest.mark.skipif(
    "rescale" not in METHODS["dare_ties"].global_params,
    reason="needs mergekit's dare_ties parameters (density as keep fraction, normalize, rescale)",
)


@DIALECT
def test_dare_ties_with_per_model_gradients_matches_mergekit(deep, tmp_path, no_randomness):
    """density [0.4, 0.9]: layer 0 and the non-layer tensors (t=0, density 0.4) drop every entry, the others
    keep all; the weights follow their gradients."""
    base, dirs = deep
    params = [{"weight": [1, 0.2], "density": [0.4, 0.9]}, {"weight": 0.7, "density": 0.8}]
    recipe = {"merge_method": "dare_ties", "base_model": str(base), "models": recipe_models(dirs[:2], params),
              "parameters": {"normalize": False, "rescale": True}, "dtype": "float32"}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    assert max_diff(mk, rf) < 2e-6


# -- dtype and out_dtype --------------------------------------------------------------------------------
def test_out_dtype_and_dtype_match_mergekit(deep, tmp_path):
    """``out_dtype`` is the saved dtype; ``dtype`` the one inputs are cast to before merging (float32 inputs
    rounded to bfloat16 first). mergekit then also computes in bfloat16: equal to bfloat16 rounding."""
    base, dirs = deep
    models = recipe_models(dirs[:2], [{"weight": 1.0}, {"weight": 0.3}])
    for k, (dtype, out_dtype) in enumerate([("float32", "bfloat16"), ("bfloat16", None)]):
        recipe = {"merge_method": "linear", "models": models, "dtype": dtype}
        if out_dtype:
            recipe["out_dtype"] = out_dtype
        mk, rf = _run_both(recipe, tmp_path / str(k))
        assert all(t.dtype == torch.bfloat16 for t in rf.values())
        assert max_diff(mk, rf) <= 2**-8
        config = json.loads((tmp_path / str(k) / "rf" / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
    # bfloat16 inputs and output, float32 arithmetic in both tools: bit for bit on a rounding-free weight
    recipe = {"merge_method": "linear", "models": recipe_models(dirs[:2], [{"weight": 1.0}, {"weight": 1.0}]),
              "dtype": "bfloat16", "out_dtype": "float32"}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path / "f32")
    assert all(t.dtype == torch.float32 for t in rf.values())
    assert max_diff(mk, rf) <= 2**-8


# -- refusals and ignored keys ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,match",
    [
        ({"models": ["a+adapter"]}, "model\\+lora"),
        ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "not both"),
        ({"models": [{"model": "a", "parameters": {"weight": [{"filter": "x"}]}}]}, "filter: SUBSTRING"),
        ({"models": [{"model": "a", "parameters": {"weight": [[1, 2]]}}]}, "lists do not nest"),
        ({"models": [{"model": "a", "parameters": {"weight": [1, "x"]}}]}, "weight must be a finite number"),
        ({"parameters": {"normalize": [{"filter": 3, "value": True}]}}, "filter: expected a string"),
    ],
)
def test_grammar_errors_name_the_option(change, match):
    recipe = {"merge_method": "linear", "models": ["a", "b"], **change}
    with pytest.raises(ValueError, match=match):
        parse_recipe(recipe)


def test_slice_errors_name_the_slice(deep, tmp_path):
    base, dirs = deep
    src = [{"model": str(dirs[0]), "layer_range": [0, 2]}, {"model": str(dirs[1]), "layer_range": [0, 3]}]
    with pytest.raises(ValueError, match=r"slices\[0\].sources: every source must span the same"):
        parse_recipe({"merge_method": "linear", "slices": [{"sources": src}]})
    missing_base = {"merge_method": "ties", "base_model": str(base),
                    "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2]}]}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"slices\[0\]: base model .* is not one of the slice's sources"):
        parse_recipe(missing_base)
    with pytest.warns(UserWarning, match="residual_weight is ignored"):
        parse_recipe({"merge_method": "passthrough",
                      "slices": [{"sources": src[:1], "residual_weight": 0.5}]})  # fmt: skip


def test_slices_of_another_width_are_refused_naming_the_tensor(deep, tmp_path):
    """Stacking a layer of a wider model into the output's config: refused before anything is written."""
    _, dirs = deep
    wide, _ = build_family(tmp_path / "wide", n=0, config=tiny_config(hidden=48, layers=4), tokenizer=False)
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(wide), "layer_range": [2, 4]}]}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor 'model.layers.2.*does not fit the output's config"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gradient_parameters_are_checked_per_tensor(deep, tmp_path):
    """A filter that leaves a required parameter unset on some tensor is an error naming that tensor, before
    anything is written (mergekit: "Missing required parameter t")."""
    base, dirs = deep
    recipe = {"merge_method": "nearswap", "base_model": str(base), "models": recipe_models(dirs[:1], [{}]),
              "parameters": {"t": [{"filter": "mlp", "value": 0.5}]}}  # fmt: skip
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        models = recipe_models([base, dirs[0]], [{}, {}])
        run_merge(MergeConfiguration.model_validate({**recipe, "models": models}), str(tmp_path / "mk"),
                  mergekit_options())  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor '(?!.*mlp).*'.*needs parameter 't'"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_interpolated_values_are_checked_again(deep, tmp_path):
    """An integer parameter's gradient between 10 and 15 gives 11.67 at layer 1: mergekit's validation refuses
    it, robustft names the tensor and the parameter before writing."""
    _, dirs = deep
    recipe = {"merge_method": "karcher", "models": recipe_models(dirs[:2], [{}, {}]),
              "parameters": {"max_iter": [10, 15]}}  # fmt: skip
    with pytest.raises(Exception, match="max_iter|int"):
        run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), mergekit_options())
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.*max_iter must be a non-negative integer"):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- Hub model ids through the hub cache -------------------------------------------------------------------
def _hub_cache(root: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """A huggingface_hub cache entry built by hand: models--org--name/{refs/main, snapshots/<commit>/...}."""
    entry = root / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return snap


def test_hub_ids_resolve_through_the_offline_cache(deep, tmp_path, monkeypatch):
    base, dirs = deep
    cache = tmp_path / "hub"
    _hub_cache(cache, "org/base", base)
    _hub_cache(cache, "org/ft", dirs[0], commit="b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = {"merge_method": "ties", "base_model": str(base),
             "models": recipe_models(dirs[:1], [{"density": 0.5}]), "dtype": "float32"}  # fmt: skip
    hub = {**local, "base_model": "org/base",
           "models": recipe_models(["org/ft@" + "b" * 40], [{"density": 0.5}])}  # fmt: skip
    merge_checkpoints(parse_recipe(local), tmp_path / "local", progress=False)
    merge_checkpoints(parse_recipe(hub), tmp_path / "hub_out", progress=False)
    a, b = load_all(tmp_path / "local"), load_all(tmp_path / "hub_out")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "hub_out" / "config.json").is_file()
    missing = {**hub, "models": recipe_models(["org/absent"], [{}])}
    with pytest.raises(
        FileNotFoundError, match=r"model org/absent: .*HF_HUB_OFFLINE.*hf download org/absent"
    ):
        merge_checkpoints(parse_recipe(missing), tmp_path / "nothing", progress=False)
    assert not (tmp_path / "nothing").exists()
