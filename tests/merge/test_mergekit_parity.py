"""Parity with mergekit 0.1.5 (issue 21): the same YAML through ``mergekit`` (its Python API ``run_merge``,
in process) and ``robustft merge`` on the same tiny sharded Llama checkpoints, every tensor compared.

Each case is a recipe in mergekit's own form (weights given, the base listed under ``models`` where
mergekit's examples do). A case passes when both tools write the same tensors (float rounding: 1e-6
absolute + 1e-5 relative; TIES sign ties, FACTS.md, up to a 1e-4 fraction), or when robustft refuses the
recipe with the named reason. Random drops (DARE, DELLA) draw from different random streams in the two
tools: they are compared with density 1 (no draw: exact), with the same mask injected into both tools'
draw, and by their keep rates. The last test walks mergekit's method registry: every method is covered
here or listed in ``robustft.merge.registry.MERGEKIT_REFUSED`` (shown in docs/merging.md).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.merge.registry import MERGEKIT_REFUSED, IgnoredParameterWarning
from tests.merge.tiny_models import build_family, load_all

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402
from mergekit.merge_methods.registry import registered_methods  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A base and three fine-tuned copies, each sharded (20 KB shards), built once for the module."""
    base, dirs = build_family(tmp_path_factory.mktemp("parity"), n=3, max_shard_size="20KB", tokenizer=False)
    assert len(list(base.glob("*.safetensors"))) > 1
    paths = {"base": str(base), "a": str(dirs[0]), "b": str(dirs[1]), "c": str(dirs[2])}
    return {**paths, "tensors": load_all(base)}


def _models(ckpt, entries):
    """``[("a", {params}), ("base", {}), ...]`` -> mergekit's ``models:`` list."""
    return [{"model": ckpt[k], **({"parameters": p} if p else {})} for k, p in entries]


def _recipe(ckpt, method, entries, parameters=None, base=True):
    recipe = {"merge_method": method, "models": _models(ckpt, entries), "dtype": "float32"}
    if base:
        recipe["base_model"] = ckpt["base"]
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def _mergekit(recipe, out, seed=0):
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options)
    return load_all(out)


def _robustft(recipe, out):
    merge_checkpoints(parse_recipe(recipe), out, progress=False, workers=1)
    return load_all(out)


def _both(recipe, tmp_path, seed=0):
    return _mergekit(recipe, tmp_path / "mk", seed), _robustft(recipe, tmp_path / "rf")


def _assert_same(mk, rf, ckpt=None, atol=1e-6, tie_fraction=0.0):
    """Same names; equal within float rounding except at most ``tie_fraction`` of the elements; and the
    merge changed something (when the base is given: not a copy of it)."""
    assert set(mk) == set(rf)
    for name in rf:
        close = torch.isclose(rf[name], mk[name].to(rf[name].dtype), rtol=1e-5, atol=atol)
        bad = float((~close).float().mean())
        worst = float((rf[name] - mk[name]).abs().max())
        assert bad <= tie_fraction, f"{name}: {bad:.2%} of the elements differ (max {worst:.3g})"
    if ckpt is not None:
        assert any(not torch.equal(rf[n], ckpt["tensors"][n]) for n in rf), "the output is the base"


W3 = [("a", {"weight": 1.0}), ("b", {"weight": 0.6}), ("c", {"weight": 1.3})]

# -- the list: recipes robustft used to read differently (each once a silent difference) -----------
SEMANTICS = {
    # ties without density: mergekit keeps everything (density 1.0)
    "ties_without_density": ("ties", W3, None),
    # dare_ties, density 1: no drop; mergekit sums (normalize false)
    "dare_ties_density_1": ("dare_ties", [(k, {**p, "density": 1.0}) for k, p in W3], None),
    # dare_linear with weights only: density 1.0, a weighted sum
    "dare_linear_weights_only": ("dare_linear", W3, None),
    # breadcrumbs with gamma only: density 1.0 keeps everything, gamma has no effect
    "breadcrumbs_gamma_only": ("breadcrumbs", [(k, {**p, "gamma": 0.1}) for k, p in W3], None),
    "breadcrumbs_density_gamma": ("breadcrumbs", [(k, {**p, "density": 0.5, "gamma": 0.1}) for k, p in W3],
                                  {"rescale": True}),
    "breadcrumbs_ties_density_gamma": ("breadcrumbs_ties",
                                       [(k, {**p, "density": 0.6, "gamma": 0.05}) for k, p in W3],
                                       {"normalize": True}),
    # karcher: equal weights whatever the per-model weight says, the base one more point
    "karcher_with_base": ("karcher", [("a", {}), ("b", {}), ("c", {})], None),
    # normalize, rescale, int8_mask given explicitly
    "ties_normalize_false_rescale": ("ties", [(k, {**p, "density": 0.3}) for k, p in W3],
                                     {"normalize": False, "rescale": True, "int8_mask": True}),
    "task_arithmetic_normalize": ("task_arithmetic", W3, {"normalize": True, "lambda": 0.7}),
    "dare_linear_normalize_no_rescale": ("dare_linear", W3, {"normalize": True, "rescale": False}),
    "della_density_1": ("della", [(k, {**p, "density": 1.0}) for k, p in W3], {"int8_mask": True}),
    "della_linear_density_1": ("della_linear", W3, {"normalize": True}),
    "model_stock_filter_wise": ("model_stock", [("a", {}), ("b", {}), ("c", {})], {"filter_wise": True}),
    # the base listed under models, mergekit's usual form (its parameters ignored by ties)
    "ties_base_in_models": ("ties", [("base", {}), *[(k, {**p, "density": 0.4}) for k, p in W3]], None),
    "slerp_base_in_models": ("slerp", [("base", {}), ("a", {})], {"t": 0.3}),
    "nearswap_base_in_models": ("nearswap", [("base", {}), ("a", {})], {"t": 0.01}),
    "arcee_fusion_base_in_models": ("arcee_fusion", [("base", {}), ("a", {})], None),
    # linear with a base_model: the base is one more input (it needs a weight)
    "linear_with_base": ("linear",
                         [("base", {"weight": 0.5}), ("a", {"weight": 1.0}), ("b", {"weight": 2.0})], None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SEMANTICS))
def test_mergekit_semantics(ckpt, tmp_path, case):
    method, entries, parameters = SEMANTICS[case]
    mk, rf = _both(_recipe(ckpt, method, entries, parameters), tmp_path)
    _assert_same(mk, rf, ckpt, tie_fraction=1e-4 if "ties" in method else 0.0)


# parameters mergekit accepts and ignores: robustft ignores them too, with a warning naming them
IGNORED = {
    "karcher_weight": ("karcher", [("a", {"weight": 1.0}), ("b", {"weight": 3.0})], None, ["weight"]),
    "sce_weight": ("sce", W3, {"select_topk": 0.5}, ["weight"]),
    "linear_lambda": ("linear", W3, {"lambda": 0.5}, ["lambda"]),
    "nuslerp_lambda": ("nuslerp", W3[:2], {"lambda": 0.5}, ["lambda"]),
    "multislerp_lambda": ("multislerp", W3, {"lambda": 0.5}, ["lambda"]),
}


@pytest.mark.parametrize("case", sorted(IGNORED))
def test_parameters_mergekit_ignores_are_ignored_with_a_warning(ckpt, tmp_path, case):
    method, entries, parameters, names = IGNORED[case]
    recipe = _recipe(ckpt, method, entries, parameters, base=method != "linear")
    mk = _mergekit(recipe, tmp_path / "mk")
    with pytest.warns(IgnoredParameterWarning, match=str(names)):
        rf = _robustft(recipe, tmp_path / "rf")
    _assert_same(mk, rf)


# -- one recipe per shared method, in the form of mergekit's examples ---------------------------------------
EXAMPLES = {
    "linear": ("linear", W3, {"normalize": True}, False),
    "task_arithmetic": ("task_arithmetic", [("a", {"weight": 1.0}), ("b", {"weight": -0.5})], {"lambda": 0.8},
                        True),
    "ties": ("ties", [("base", {}), ("a", {"weight": 1.0, "density": 0.5}),
                      ("b", {"weight": 0.5, "density": 0.3}), ("c", {"weight": 0.8, "density": 0.7})],
             {"normalize": True, "int8_mask": True}, True),
    "breadcrumbs": ("breadcrumbs", [(k, {**p, "density": 0.8, "gamma": 0.02}) for k, p in W3], None, True),
    "breadcrumbs_ties": ("breadcrumbs_ties", [(k, {**p, "density": 0.8, "gamma": 0.02}) for k, p in W3],
                         {"lambda": 0.9}, True),
    "model_stock": ("model_stock", [("base", {}), ("a", {}), ("b", {}), ("c", {})], None, True),
    "slerp": ("slerp", [("base", {}), ("a", {})], {"t": 0.6}, True),
    "nuslerp": ("nuslerp", [("a", {"weight": 1.0}), ("b", {"weight": 3.0})], {"nuslerp_flatten": False},
                True),
    "nuslerp_no_base": ("nuslerp", [("a", {"weight": 1.0}), ("b", {"weight": 2.0})], None, False),
    "multislerp": ("multislerp", W3, None, True),
    "karcher": ("karcher", [("a", {}), ("b", {}), ("c", {})], {"max_iter": 20, "tol": 1e-6}, False),
    "sce": ("sce", [("a", {}), ("b", {}), ("c", {})], {"select_topk": 0.3}, True),
    "ram": ("ram", [("a", {}), ("b", {}), ("c", {})], {"epsilon": 0.02}, True),
    "ramplus_tl": ("ramplus_tl", [("a", {}), ("b", {}), ("c", {})], {"epsilon": 0.02, "r": 0.5, "alpha": 0.3},
                   True),
    "nearswap": ("nearswap", [("a", {})], {"t": 0.02}, True),
    "arcee_fusion": ("arcee_fusion", [("a", {})], None, True),
    "passthrough": ("passthrough", [("a", {"scale": 0.5})], None, False),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EXAMPLES))
def test_mergekit_example_recipes(ckpt, tmp_path, case):
    method, entries, parameters, base = EXAMPLES[case]
    mk, rf = _both(_recipe(ckpt, method, entries, parameters, base), tmp_path)
    _assert_same(mk, rf, ckpt if base else None, tie_fraction=1e-4 if "ties" in method else 0.0)


# -- random drops: the same mask injected into both tools' draw, and the keep rates of real draws ----------
@pytest.fixture
def same_mask(monkeypatch):
    """Both tools draw one uniform u per entry (mergekit: ``torch.bernoulli(p)``, robustft:
    ``torch.rand() < p``); both draws are replaced by a fixed u per tensor size (mergekit's DELLA draws a 1-D
    tensor's mask as one row), so both keep exactly the entries with u < p."""
    rand = torch.rand

    def uniform(shape):
        n = int(torch.Size(shape).numel())
        return rand(n, generator=torch.Generator().manual_seed(n)).view(tuple(shape))

    monkeypatch.setattr(torch, "rand", lambda shape, *a, **k: uniform(shape))
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (uniform(p.shape) < p).to(p.dtype))


DRAWN = {
    "dare_ties": ("dare_ties", [(k, {**p, "density": d}) for (k, p), d in zip(W3, [0.5, 0.3, 0.7])], None),
    "dare_ties_normalize": ("dare_ties", [(k, {**p, "density": 0.4}) for k, p in W3],
                            {"normalize": True, "rescale": False}),
    "dare_linear": ("dare_linear", [(k, {**p, "density": 0.4}) for k, p in W3], {"lambda": 0.9}),
    "della": ("della", [(k, {**p, "density": 0.5, "epsilon": 0.1}) for k, p in W3], None),
    "della_linear": ("della_linear", [(k, {**p, "density": 0.4, "epsilon": 0.2}) for k, p in W3], None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DRAWN))
def test_random_drops_with_the_same_mask(ckpt, tmp_path, case, same_mask):
    method, entries, parameters = DRAWN[case]
    mk, rf = _both(_recipe(ckpt, method, entries, parameters), tmp_path)
    _assert_same(mk, rf, ckpt, tie_fraction=1e-4 if "ties" in method or method == "della" else 0.0)


def test_dare_linear_keep_rate_of_real_draws(ckpt, tmp_path):
    """Real draws from each tool's own stream: an output entry equals the base's exactly where all three
    models dropped it, probability (1 - density)^3 in both tools (binomial tolerance)."""
    keep = 0.4
    recipe = _recipe(ckpt, "dare_linear", [(k, {**p, "density": keep}) for k, p in W3], {"rescale": False})
    mk, rf = _both(recipe, tmp_path, seed=0)
    base = ckpt["tensors"]
    total = sum(b.numel() for b in base.values())
    expected = (1 - keep) ** 3
    sigma = (expected * (1 - expected) / total) ** 0.5
    for out in (mk, rf):
        rate = sum(int((out[n] == b).sum()) for n, b in base.items()) / total
        assert abs(rate - expected) < 6 * sigma, (rate, expected)


# -- named refusals where robustft deliberately differs ---------------------------------------------------
@pytest.mark.parametrize(
    "method,entries,parameters,match",
    [
        ("dare_ties", [("a", {"drop_rate": 0.5})], {"density": 0.5}, "drop_rate .* not both"),
        ("breadcrumbs", [("a", {"beta": 0.1})], None, "'beta' is refused .* gamma"),
        ("linear", [("base", {}), ("a", {"weight": 1.0})], None, r"base_model .* needs parameter 'weight'"),
    ],
)
def test_named_refusals(ckpt, method, entries, parameters, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(_recipe(ckpt, method, entries, parameters))


def test_every_mergekit_method_is_covered_or_refused():
    """Walk mergekit's registry: each method has a parity case above or a documented refusal."""
    covered = {spec[0] for table in (SEMANTICS, EXAMPLES, DRAWN, IGNORED) for spec in table.values()}
    names = {m.spec.name for m in registered_methods()}
    missing = sorted(names - covered - set(MERGEKIT_REFUSED))
    assert not missing, f"mergekit methods neither covered by the parity suite nor refused: {missing}"
    assert not (covered & set(MERGEKIT_REFUSED)), "a refused method cannot also be covered"


def test_no_warning_on_a_plain_mergekit_recipe(ckpt):
    """The warnings above are about ignored parameters only: mergekit's usual TIES recipe parses silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_recipe(_recipe(ckpt, "ties", [("base", {}), *[(k, {**p, "density": 0.5}) for k, p in W3]]))
