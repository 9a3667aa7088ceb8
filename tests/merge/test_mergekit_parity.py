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

import shutil
import warnings

import pytest
import torch

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.merge.registry import MERGEKIT_REFUSED, IgnoredParameterWarning
from tests.merge.tiny_models import build_family, load_all, save_word_tokenizer, word_family

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


# -- claims of docs/merging.md run against mergekit (docs/claims.md) ---------------------------------------
# A zero divisor: weights +1 and -1 sum to 0 (task_arithmetic everywhere; ties where the weighted deltas
# agree in sign, i.e. where the two task vectors have opposite signs: about half the entries).
ZERO_DIVISOR = {
    "ties": ("ties", [("a", {"weight": 1.0, "density": 1.0}), ("b", {"weight": -1.0, "density": 1.0})]),
    "task_arithmetic": ("task_arithmetic", [("a", {"weight": 1.0}), ("b", {"weight": -1.0})]),
    "della_linear": ("della_linear", [("a", {"weight": 1.0, "density": 1.0}), ("b", {"weight": -1.0})]),
}


@pytest.mark.parametrize("case", sorted(ZERO_DIVISOR))
def test_zero_divisor_is_taken_as_one_as_mergekit(ckpt, tmp_path, case):
    method, entries = ZERO_DIVISOR[case]
    mk, rf = _both(_recipe(ckpt, method, entries, {"normalize": True}), tmp_path)
    _assert_same(mk, rf, ckpt, tie_fraction=1e-4 if "ties" in method else 0.0)
    a, b, base = load_all(ckpt["a"]), load_all(ckpt["b"]), ckpt["tensors"]
    name = "model.layers.0.mlp.down_proj.weight"
    opposite = (a[name] - base[name]).sign() * (b[name] - base[name]).sign() < 0
    assert opposite.any() and torch.allclose(rf[name][opposite], a[name][opposite] - b[name][opposite] + base[
        name][opposite], atol=1e-6), "the zero divisor was not reached (or not taken as 1)"  # fmt: skip


def _save_weights(tensors: dict[str, torch.Tensor], config_from: str, path) -> str:
    """A model folder with ``tensors`` in one safetensors file and ``config_from``'s config (no tokenizer)."""
    import shutil

    from safetensors.torch import save_file

    path.mkdir()
    save_file({n: t.contiguous() for n, t in tensors.items()}, path / "model.safetensors", {"format": "pt"})
    shutil.copyfile(f"{config_from}/config.json", path / "config.json")
    return str(path)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_cosine_floor_as_mergekit(ckpt, tmp_path, filter_wise):
    """Model a's delta scaled by 1e-6: the products of its norm with b's and c's are below 1e-6, where
    mergekit divides the dot product by 1e-6."""
    base, a = ckpt["tensors"], load_all(ckpt["a"])
    tiny = _save_weights({n: base[n] + 1e-6 * (a[n] - base[n]) for n in base}, ckpt["base"],
                         tmp_path / "tiny")  # fmt: skip
    small, other = load_all(tiny), load_all(ckpt["b"])
    name = "model.layers.0.self_attn.k_proj.weight"
    norms = (small[name] - base[name]).norm() * (other[name] - base[name]).norm()
    assert 0 < norms < 1e-6
    recipe = {"merge_method": "model_stock", "base_model": ckpt["base"], "dtype": "float32",
              "parameters": {"filter_wise": filter_wise},
              "models": [{"model": tiny}, {"model": ckpt["b"]}, {"model": ckpt["c"]}]}  # fmt: skip
    mk, rf = _both(recipe, tmp_path)
    _assert_same(mk, rf, ckpt, atol=1e-5)


def test_revision_of_a_local_folder_is_ignored_as_mergekit(ckpt, tmp_path):
    recipe = _recipe(ckpt, "ties", [(k, {**p, "density": 0.5}) for k, p in W3])
    plain = _robustft(recipe, tmp_path / "plain")
    recipe["base_model"] += "@main"
    recipe["models"] = [{**m, "model": m["model"] + "@some-branch"} for m in recipe["models"]]
    mk, rf = _both(recipe, tmp_path)
    _assert_same(mk, rf, ckpt, tie_fraction=1e-4)
    _assert_same(plain, rf)


def test_relative_paths_from_the_current_directory_as_mergekit(ckpt, tmp_path, monkeypatch):
    """Paths relative to the current directory: a recipe naming the models by folder name, run from their
    parent folder, gives mergekit's output (and the absolute recipe's)."""
    from pathlib import Path

    recipe = _recipe(ckpt, "task_arithmetic", W3, {"lambda": 0.8})
    absolute = _robustft(recipe, tmp_path / "abs")
    monkeypatch.chdir(Path(ckpt["base"]).parent)
    recipe["base_model"] = Path(ckpt["base"]).name
    recipe["models"] = [{**m, "model": Path(m["model"]).name} for m in recipe["models"]]
    mk, rf = _both(recipe, tmp_path)
    _assert_same(mk, rf, ckpt)
    _assert_same(absolute, rf)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=Path(ckpt["base"]).name):
        _robustft(recipe, tmp_path / "elsewhere")


WORD = [f"w{i}" for i in range(28)]
WORDS = {"A": ["[UNK]", "[PAD]", *WORD, "a0", "a1"], "B": ["[PAD]", "[UNK]", *WORD[::-1], "a1", "b0"]}


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """Two tiny Llamas with word-level tokenizers of 32 and 32 tokens (B: A's words reversed, b0 for a0)."""
    return word_family(tmp_path_factory.mktemp("worded"), WORDS)


def _worded_recipe(base: str, models: list[str], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": 0.7 - 0.3 * i}} for i, m in enumerate(models)],
            **extra}  # fmt: skip


def _side_files(path) -> dict[str, str]:
    """The output's files other than the weights, robustft's copy of the recipe and the generation config
    (robustft copies it, mergekit 0.1.5 does not): name -> text."""
    skip = ("robustft_merge.yaml", "model.safetensors.index.json", "generation_config.json")
    return {p.name: p.read_text() for p in path.iterdir() if not p.name.endswith(".safetensors")
            and p.name not in skip}  # fmt: skip


@pytest.mark.parametrize("source", [None, "base"])
def test_no_copy_tokenizer_writes_what_mergekit_writes(worded, tmp_path, source):
    """``--no-copy-tokenizer`` with a ``chat_template``: without a tokenizer_source nothing but the config
    (no template); with one, the built tokenizer and its template, as mergekit."""
    import json

    import yaml

    from robustft.cli import main

    extra = {"tokenizer_source": source} if source else {}
    recipe = _worded_recipe(worded["A"], [worded["B"]], chat_template="chatml", **extra)
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    args = ["merge", str(tmp_path / "r.yaml"), str(tmp_path / "rf"), "--no-copy-tokenizer", "--no-progress"]
    if source is None:  # mergekit logs "Chat template specified but no tokenizer found"
        with pytest.warns(UserWarning, match="no tokenizer is written: it is not saved"):
            assert main(args) == 0
    else:
        assert main(args) == 0
    mk, rf = _side_files(tmp_path / "mk"), _side_files(tmp_path / "rf")
    assert set(mk) == set(rf)
    assert ("chat_template.jinja" in rf) == (source is not None)
    for name in set(rf) - {"config.json"}:
        assert (json.loads(rf[name]) if name.endswith(".json") else rf[name]) == (
            json.loads(mk[name]) if name.endswith(".json") else mk[name]), name  # fmt: skip
    _assert_same(load_all(tmp_path / "mk"), load_all(tmp_path / "rf"))


def test_model_without_a_tokenizer_has_the_base_vocabulary_as_mergekit(worded, tmp_path, caplog):
    """Model D has A's 32 rows and no tokenizer files: both tools read it with A's vocabulary (a warning)."""
    import logging

    from transformers import AutoTokenizer

    torch.manual_seed(9)
    noisy = {n: t + 0.05 * torch.randn_like(t) for n, t in load_all(worded["A"]).items()}
    d = _save_weights(noisy, worded["A"], tmp_path / "D")
    recipe = _worded_recipe(worded["A"], [worded["B"], d], tokenizer_source="union")
    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(parse_recipe(recipe), tmp_path / "rf", progress=False, workers=1)
    assert "taking it to have the vocabulary of" in caplog.text
    mk_v = AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    assert AutoTokenizer.from_pretrained(tmp_path / "rf").get_vocab() == mk_v and "b0" in mk_v
    _assert_same(load_all(tmp_path / "mk"), load_all(tmp_path / "rf"))


def _refused_recipe(worded, tmp_path, case: str) -> dict:
    """The first four recipes of docs/merging.md's refused table."""
    a, b = worded["A"], worded["B"]
    if case == "base_lacks_token":
        return _worded_recipe(a, [b], tokenizer={"source": "base", "tokens": {"b0": {"source": b}}})
    if case == "id_beyond_vocab_size":  # B's tokenizer has a0 (A's id 30) at id 32, beyond its 32 rows
        short = tmp_path / "short"
        shutil.copytree(b, short)
        save_word_tokenizer([*WORDS["B"], "a0"], short)
        return _worded_recipe(a, [str(short)], tokenizer_source="union")
    if case == "no_source":
        return _worded_recipe(a, [b], tokenizer={"source": "union", "tokens": {"b0": {}}})
    return _worded_recipe(a, [b], tokenizer={"source": "union", "tokens": {"b0": {"source": "elsewhere"}}})


@pytest.mark.parametrize(
    "case, mergekit_error, match",
    [
        ("base_lacks_token", KeyError, "token 'b0' has id 32 .* beyond its vocab_size 32"),
        ("id_beyond_vocab_size", KeyError, "token 'a0' has id 32 .* beyond its vocab_size 32"),
        ("no_source", NotImplementedError, r"tokenizer.tokens\['b0'\]: give a source"),
        ("foreign_source", ValueError, r"\['b0'\].source: .* is not one of the merged models"),
    ],
)
def test_vocabulary_refusals_where_mergekit_raises(worded, tmp_path, case, mergekit_error, match):
    """Where mergekit stops with an exception, robustft refuses the recipe by name and writes nothing."""
    recipe = _refused_recipe(worded, tmp_path, case)
    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True)
    with pytest.raises(mergekit_error):
        run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"), options)
    out = tmp_path / "rf"
    with pytest.raises(ValueError, match=match):
        merge_checkpoints(parse_recipe(recipe), out, progress=False)
    assert not out.exists()
