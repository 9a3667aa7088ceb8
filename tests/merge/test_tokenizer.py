"""Output vocabularies (``tokenizer_source``, ``tokenizer:``) against mergekit 0.1.5 run in the test.

Three tiny Llamas with word-level tokenizers of 64, 72 and 64 tokens that overlap in different orders:
A (the base) has w0..w59, a0, a1; B has w59..w0 reversed and b0..b9; C has w0..w54 shuffled, c0..c4, a0,
b0. So the union needs rows a model lacks from the base (w55..w59 for C), a donor (a1, b1.., c*) and the
mean of the models that have it (b0: B and C). mergekit appends the union's new tokens in a hash map's
order (a different one per run), so union outputs are compared token by token; everything else exactly.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from robustft.merge import merge_checkpoints, parse_recipe
from robustft.merge.io import TOKENIZER_FILES, CheckpointReader
from robustft.merge.tokenizer import remap_rows
from tests.merge.tiny_models import load_all, save_word_tokenizer, word_family

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5)")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

COMMON = [f"w{i}" for i in range(60)]
_shuffled = COMMON[:55]
random.Random(0).shuffle(_shuffled)
VOCABS = {
    "A": ["[UNK]", "[PAD]", *COMMON, "a0", "a1"],
    "B": ["[PAD]", "[UNK]", *COMMON[::-1], *(f"b{i}" for i in range(10))],
    "C": ["[UNK]", "[PAD]", *_shuffled, *(f"c{i}" for i in range(5)), "a0", "b0"],
}


def _family(root, tied: bool | set[str], vocabs: dict[str, list[str]] = VOCABS) -> dict[str, str]:
    return word_family(root, vocabs, tied)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("tied"), tied=True)


def _recipe(m: dict[str, str], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": m["A"],
            "models": [{"model": m["B"], "parameters": {"weight": 0.7}},
                       {"model": m["C"], "parameters": {"weight": 0.4}}],
            "dtype": "float32", **extra}  # fmt: skip


def _run_both(recipe: dict, tmp_path):
    mk, rf = tmp_path / "mergekit", tmp_path / "robustft"
    options = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, lazy_unpickle=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(mk), options)
    merge_checkpoints(parse_recipe(recipe), rf, progress=False)
    return mk, rf


def _vocab(path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(path).get_vocab()


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def _assert_same(mk, rf, same_order: bool) -> None:
    """Same tensors, vocabulary and config vocab_size/tying; embedding rows compared token by token (and
    the padding rows beyond the vocabulary) unless ``same_order``."""
    mk_v, rf_v = _vocab(mk), _vocab(rf)
    assert set(mk_v) == set(rf_v)
    if same_order:
        assert mk_v == rf_v
    tok_files = [f for f in TOKENIZER_FILES if (mk / f).exists() or (rf / f).exists()]
    assert tok_files and all((mk / f).exists() and (rf / f).exists() for f in tok_files), tok_files
    assert json.loads((rf / "tokenizer_config.json").read_text()) == json.loads(
        (mk / "tokenizer_config.json").read_text()
    )
    if same_order:
        assert json.loads((rf / "tokenizer.json").read_text()) == json.loads(
            (mk / "tokenizer.json").read_text()
        )
    for key in ("vocab_size", "tie_word_embeddings"):
        assert _config(rf)[key] == _config(mk)[key], key
    a, b = load_all(mk), load_all(rf)
    assert set(a) == set(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if "embed_tokens" in name or "lm_head" in name:
            words = list(mk_v)
            rows_mk, rows_rf = [mk_v[w] for w in words], [rf_v[w] for w in words]
            torch.testing.assert_close(b[name][rows_rf], a[name][rows_mk], rtol=0, atol=1e-6, msg=name)
            n = len(mk_v)
            torch.testing.assert_close(b[name][n:], a[name][n:], rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_union_matches_mergekit_token_by_token(untied, tmp_path):
    mk, rf = _run_both(_recipe(untied, tokenizer_source="union"), tmp_path)
    _assert_same(mk, rf, same_order=False)
    rf_v = _vocab(rf)
    assert len(rf_v) == 64 + 10 + 5 and load_all(rf)["lm_head.weight"].shape[0] == 79
    assert {w: i for w, i in rf_v.items() if i < 64} == {w: i for i, w in enumerate(VOCABS["A"])}


def test_base_and_model_sources_match_mergekit(untied, tmp_path):
    for source, rows in (("base", 64), (untied["B"], 72)):
        out = tmp_path / str(rows)
        mk, rf = _run_both(_recipe(untied, tokenizer_source=source), out)
        _assert_same(mk, rf, same_order=True)
        assert _config(rf)["vocab_size"] == rows


def test_no_tokenizer_source_copies_the_base_tokenizer_as_mergekit(untied, tmp_path):
    """``tokenizer_source: null`` is mergekit's default: no vocabulary plan, the reference's files copied."""
    recipe = {"merge_method": "linear", "models": [{"model": untied["B"], "parameters": {"weight": 1.0}}],
              "dtype": "float32", "tokenizer_source": None}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    _assert_same(mk, rf, same_order=True)
    assert (rf / "tokenizer.json").read_bytes() == (mk / "tokenizer.json").read_bytes()


def test_base_source_cuts_padded_embeddings_as_mergekit(untied, tmp_path):
    """A base whose embedding has 70 rows for a 64-token tokenizer: the output has the tokenizer's 64."""
    torch.manual_seed(5)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=70, max_position_embeddings=32,
                         tie_word_embeddings=False)  # fmt: skip
    padded = tmp_path / "padded"
    LlamaForCausalLM(config).save_pretrained(padded)
    save_word_tokenizer(VOCABS["A"], padded)
    recipe = {**_recipe(untied, tokenizer_source="base"), "base_model": str(padded)}
    mk, rf = _run_both(recipe, tmp_path / "out")
    _assert_same(mk, rf, same_order=True)
    assert _config(rf)["vocab_size"] == 64


def test_tokenizer_block_with_token_sources_and_padding_matches_mergekit(untied, tmp_path):
    block = {
        "source": "union",
        "pad_to_multiple_of": 32,
        "tokens": {
            "newtok": {"source": {"kind": "zero"}},
            "w3": {"source": untied["B"], "force": True},
            "b1": {"source": {"kind": "model_token", "model": untied["A"], "token": "w5"}},
            "c2": {"source": {"kind": "model_token", "model": untied["B"], "token_id": 3}},
            "a0": {"source": untied["C"]},
        },
    }
    mk, rf = _run_both(_recipe(untied, tokenizer=block), tmp_path)
    _assert_same(mk, rf, same_order=False)
    assert _config(rf)["vocab_size"] == 96 and "newtok" in _vocab(rf)


def test_tied_embeddings_union_matches_mergekit(tied, tmp_path):
    mk, rf = _run_both(_recipe(tied, tokenizer_source="union"), tmp_path)
    _assert_same(mk, rf, same_order=False)
    assert "lm_head.weight" not in load_all(rf) and _config(rf)["tie_word_embeddings"] is True


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"tokenizer": {"source": "base", "tokens": {"newtok": {"source": {"kind": "zero"}}}}}, "KeyError"),
        ({"tokenizer": {"tokens": {"b1": {}}}}, "give a source"),
        ({"tokenizer": {"tokens": {"b1": {"source": "elsewhere"}}}}, "not one of the merged models"),
    ],
)
def test_refusals_name_the_option_and_write_nothing(untied, tmp_path, extra, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        merge_checkpoints(parse_recipe(_recipe(untied, **extra)), out, progress=False)
    assert not out.exists()


def test_both_keys_refused_as_mergekit(untied):
    with pytest.raises(ValueError, match="tokenizer_source or tokenizer, not both"):
        parse_recipe(_recipe(untied, tokenizer_source="union", tokenizer={"source": "union"}))


def test_remap_rows_against_indexing():
    t = torch.randn(5, 3)
    rows = torch.tensor([4, -1, 0, 2, -1])
    fill = torch.randn(2, 3)
    out = remap_rows(t, rows, torch.tensor([1, 4]), fill, size=8)
    ref = torch.stack([t[4], fill[0], t[0], t[2], fill[1]])
    torch.testing.assert_close(out[:5], ref)
    torch.testing.assert_close(out[5:], ref.mean(0).expand(3, 3))


def test_get_rows_reads_the_rows_of_the_tensor(untied):
    reader = CheckpointReader(untied["B"])
    full = reader.get("model.embed_tokens.weight")
    rows = [0, 3, 4, 71]
    torch.testing.assert_close(reader.get_rows("model.embed_tokens.weight", rows), full[rows], rtol=0, atol=0)
    with pytest.raises(IndexError, match="no row 72"):
        reader.get_rows("model.embed_tokens.weight", [72])


# -- output vocabularies over slices -----------------------------------------------------------------------
def _src(path: str, lo: int, hi: int, **parameters) -> dict:
    out = {"model": path, "layer_range": [lo, hi]}
    return {**out, "parameters": parameters} if parameters else out


def test_passthrough_frankenmerge_with_union_matches_mergekit(untied, tmp_path):
    """Embeddings from the first slice's source (A) only, the head from the last slice's (C) only: the rows
    a source lacks are zero in mergekit, not filled from the other slices' models."""
    m = untied
    recipe = {"merge_method": "passthrough", "base_model": m["A"], "dtype": "float32",
              "tokenizer_source": "union",
              "slices": [{"sources": [_src(m["A"], 0, 2)]}, {"sources": [_src(m["B"], 1, 2)]},
                         {"sources": [_src(m["C"], 0, 1)]}]}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    _assert_same(mk, rf, same_order=False)
    out, v = load_all(rf), _vocab(rf)
    assert _config(rf)["num_hidden_layers"] == 4 and out["lm_head.weight"].shape[0] == 79
    assert not out["model.embed_tokens.weight"][v["c0"]].any() and not out["lm_head.weight"][v["b3"]].any()


def test_slerp_over_slices_with_union_matches_mergekit(untied, tmp_path):
    """Two slices of other pairs: the embeddings' rows filled from A and B, the head's from A and C."""
    m = untied
    recipe = {"merge_method": "slerp", "base_model": m["A"], "dtype": "float32", "tokenizer_source": "union",
              "parameters": {"t": [0.2, 0.7]},
              "slices": [{"sources": [_src(m["A"], 0, 1), _src(m["B"], 0, 1)]},
                         {"sources": [_src(m["A"], 1, 2), _src(m["C"], 1, 2)]}]}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    _assert_same(mk, rf, same_order=False)
    assert _config(rf)["vocab_size"] == 79


def test_tokenizer_block_over_slices_matches_mergekit(untied, tmp_path):
    m = untied
    block = {"source": "union", "pad_to_multiple_of": 16,
             "tokens": {"newtok": {"source": {"kind": "zero"}},
                        "w3": {"source": m["B"], "force": True},
                        "b1": {"source": {"kind": "model_token", "model": m["A"], "token": "w5"}},
                        "a0": {"source": m["C"]}}}  # fmt: skip

    def piece(lo, hi):
        return {"sources": [_src(m["A"], lo, hi), _src(m["B"], lo, hi, weight=0.6),
                            _src(m["C"], lo, hi, weight=0.3)]}  # fmt: skip

    recipe = {"merge_method": "task_arithmetic", "base_model": m["A"], "dtype": "float32", "tokenizer": block,
              "slices": [piece(0, 1), piece(1, 2)]}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path)
    _assert_same(mk, rf, same_order=False)
    assert _config(rf)["vocab_size"] == 80 and "newtok" in _vocab(rf)


# -- tied and untied models mixed --------------------------------------------------------------------------
SAME_VOCAB = {k: VOCABS["A"] for k in VOCABS}


@pytest.mark.parametrize("tied_models", [{"B"}, {"A"}, {"A", "C"}])
def test_tied_and_untied_models_mixed_match_mergekit(tmp_path, tied_models):
    """mergekit reads a tied model's embedding as its lm_head when another input has one; with a tied base
    it writes that head beside the base's tied config (transformers then loads the head, untied)."""
    m = _family(tmp_path / "in", tied_models, SAME_VOCAB)
    mk, rf = _run_both(_recipe(m), tmp_path / "out")
    _assert_same(mk, rf, same_order=True)
    assert "lm_head.weight" in load_all(rf)


@pytest.mark.parametrize("tied_models", [{"B"}, {"A"}])
def test_tied_and_untied_models_mixed_with_union_match_mergekit(tmp_path, tied_models):
    m = _family(tmp_path / "in", tied_models)
    mk, rf = _run_both(_recipe(m, tokenizer_source="union"), tmp_path / "out")
    _assert_same(mk, rf, same_order=False)


def test_tied_and_untied_over_slices_match_mergekit(tmp_path):
    m = _family(tmp_path / "in", {"C"})
    first = [_src(m["A"], 0, 2, weight=0.5), _src(m["B"], 0, 2, weight=0.5)]
    last = [_src(m["C"], 0, 2, weight=0.3), _src(m["A"], 0, 2, weight=0.7)]
    recipe = {"merge_method": "linear", "base_model": m["A"], "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": first}, {"sources": last}]}  # fmt: skip
    mk, rf = _run_both(recipe, tmp_path / "out")
    _assert_same(mk, rf, same_order=False)


def test_last_slice_of_tied_models_under_an_untied_config_is_refused(tmp_path):
    """mergekit writes no lm_head there while the config (A's) has an untied one: refused by name."""
    m = _family(tmp_path / "in", {"C"}, SAME_VOCAB)
    recipe = {"merge_method": "passthrough", "base_model": m["A"], "dtype": "float32",
              "slices": [{"sources": [_src(m["A"], 0, 2)]}, {"sources": [_src(m["C"], 0, 2)]}]}  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"slices\[1\]: every source of the last slice ties its embeddings"):
        merge_checkpoints(parse_recipe(recipe), out, progress=False)
    assert not out.exists()


# -- chat_template with a built vocabulary -----------------------------------------------------------------
@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """The untied family, A and C with one chat template and B with another (``auto``: the plurality)."""
    m = _family(tmp_path_factory.mktemp("chatty"), tied=False)
    for name, text in (("A", "{{ 'a' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
                       ("B", "{{ 'b' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"),
                       ("C", "{{ 'a' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")):  # fmt: skip
        tok = AutoTokenizer.from_pretrained(m[name])
        tok.chat_template = text
        tok.save_pretrained(m[name])
    return m


@pytest.mark.parametrize("template", ["chatml", "auto"])
@pytest.mark.parametrize("slices", [False, True])
def test_chat_template_with_a_built_vocabulary_matches_mergekit(chatty, tmp_path, template, slices):
    recipe = _recipe(chatty, tokenizer_source="union", chat_template=template)
    if slices:
        recipe.pop("models")
        sources = [_src(chatty[k], 0, 2, weight=w) for k, w in zip("ABC", (1.0, 0.7, 0.4), strict=True)]
        recipe["slices"] = [{"sources": sources}]
    mk, rf = _run_both(recipe, tmp_path)
    files = {p.name for p in mk.iterdir() if "token" in p.name or "chat" in p.name}
    assert files == {p.name for p in rf.iterdir() if "token" in p.name or "chat" in p.name}
    assert json.loads((rf / "tokenizer_config.json").read_text()) == json.loads(
        (mk / "tokenizer_config.json").read_text()
    )
    assert (rf / "chat_template.jinja").read_text() == (mk / "chat_template.jinja").read_text()
    assert AutoTokenizer.from_pretrained(rf).chat_template == AutoTokenizer.from_pretrained(mk).chat_template
