"""Git Re-Basin alignment (merge/align.py): the aligned model is B's function, a known permutation is found
exactly, alignment lowers the loss barrier of two independently trained MLPs, checkpoints align and merge."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from robustft.cli import main
from robustft.merge.align import (
    UnalignableError,
    activation_matching,
    align_checkpoints,
    align_models,
    align_state_dicts,
    permutation_spec,
    unit_readers,
    weight_matching,
)
from robustft.ops.rebasin import apply_permutations
from tests.merge.tiny_models import load_all, save_model, spirals, tiny_config, tiny_mlp, train_mlp


def _llama(seed, kv=2, intermediate=64):
    torch.manual_seed(seed)
    cfg = tiny_config(intermediate=intermediate)
    cfg.num_key_value_heads, cfg.attention_bias = kv, True  # GQA (2) or MHA (4); q/k/v/o biases move too
    return LlamaForCausalLM(cfg).eval()


def _gpt2(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def _bert(seed):
    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


FAMILIES = {
    "mlp": (tiny_mlp, lambda m: torch.randn(5, 8, generator=torch.Generator().manual_seed(9))),
    "llama-mha": (lambda s: _llama(s, kv=4), lambda m: torch.randint(0, 128, (2, 9))),
    "llama-gqa": (_llama, lambda m: torch.randint(0, 128, (2, 9))),
    "gpt2": (_gpt2, lambda m: torch.randint(0, 64, (2, 9))),
    "bert": (_bert, lambda m: torch.randint(0, 64, (2, 9))),
}


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y[0]


def _config(model):
    return model.config.to_dict() if hasattr(model, "config") else None


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_model_computes_the_same_function_and_units_moved(family):
    build, inputs = FAMILIES[family]
    a, b = build(0), build(1)
    aligned, perms = align_state_dicts(a.state_dict(), b.state_dict(), _config(b))
    assert any((p != torch.arange(len(p))).any() for p in perms.values())  # something did move
    c = build(2)
    c.load_state_dict(aligned)
    x = inputs(b)
    torch.testing.assert_close(_out(c, x), _out(b, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(a, x), _out(b, x))  # the check can fail: A is another function


@pytest.mark.parametrize("family", FAMILIES)
def test_a_randomly_permuted_copy_is_aligned_back_bit_for_bit(family):
    build, _ = FAMILIES[family]
    sd = build(0).state_dict()
    spec = permutation_spec({k: tuple(v.shape) for k, v in sd.items()}, _config(build(0)))
    g = torch.Generator().manual_seed(5)
    truth = {k: torch.randperm(n, generator=g) for k, n in spec.sizes.items()}
    shuffled = apply_permutations(spec, truth, sd)
    assert any(not torch.equal(shuffled[k], sd[k]) for k in sd)
    back, _ = align_state_dicts(sd, shuffled, _config(build(0)))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_the_spec_covers_llama_mlp_units_and_whole_kv_groups():
    m = _llama(0)
    spec = permutation_spec({k: tuple(v.shape) for k, v in m.state_dict().items()}, m.config.to_dict())
    assert spec.sizes == {"layer0.mlp": 64, "layer0.heads": 2, "layer1.mlp": 64, "layer1.heads": 2}
    heads = {(a.tensor.split(".")[-2], a.dim, a.block) for a in spec.axes["layer0.heads"]}
    # 4 query heads over 2 kv heads of dim 8: a kv group is 2 query heads (16 rows of q, 16 columns of o)
    assert ("q_proj", 0, 16) in heads and ("k_proj", 0, 8) in heads and ("o_proj", 1, 16) in heads
    assert all("norm" not in a.tensor and "embed" not in a.tensor for ax in spec.axes.values() for a in ax)


def _barrier(a, b, x, y):
    """max over α of loss((1−α)A + αB) − ((1−α)loss(A) + α loss(B)), on 21 points of α."""
    model = tiny_mlp(0, widths=(2, 64, 64, 3))
    sa, sb = a.state_dict(), b.state_dict()
    losses = []
    for t in torch.linspace(0, 1, 21).tolist():
        model.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] for k in sa})
        with torch.no_grad():
            losses.append((t, torch.nn.functional.cross_entropy(model(x), y).item()))
    ends = losses[0][1], losses[-1][1]
    return max(loss - ((1 - t) * ends[0] + t * ends[1]) for t, loss in losses)


@pytest.mark.slow  # trains two MLPs (~6 s quiet)
def test_alignment_lowers_the_loss_barrier_of_two_independently_trained_mlps():
    """Two MLPs from different inits on the same toy task (3 interleaved spirals); barrier before vs after."""
    x, label = spirals()
    a, b = train_mlp(1, x, label), train_mlp(2, x, label)
    before = _barrier(a, b, x, label)
    aligned, _ = align_state_dicts(a.state_dict(), b.state_dict())
    c = tiny_mlp(0, widths=(2, 64, 64, 3))
    c.load_state_dict(aligned)
    after = _barrier(a, c, x, label)
    print(f"\nloss barrier along linear interpolation: before alignment {before:.4f}, after {after:.4f}")
    assert after < before  # only the direction: the figures depend on the toy task


def test_weight_matching_stops_after_a_sweep_that_improves_nothing():
    sd = tiny_mlp(0).state_dict()
    spec = permutation_spec({k: tuple(v.shape) for k, v in sd.items()})
    perms, sweeps = weight_matching(spec, sd, sd)
    assert sweeps == 1 and all(torch.equal(p, torch.arange(len(p))) for p in perms.values())


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    a, b = _llama(0), _llama(1)
    save_model(a, root / "a", max_shard_size="40KB", tokenizer=True)
    save_model(b, root / "b", max_shard_size="40KB", tokenizer=True)
    return root, a, b


def test_cli_aligns_a_sharded_llama_checkpoint_and_the_aligned_pair_merges(llama_pair, tmp_path):
    root, a, b = llama_pair
    out = tmp_path / "b_aligned"
    assert main(["align", "--reference", str(root / "a"), "--model", str(root / "b"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in (root / "b").glob("*.safetensors")
    )
    info = json.loads((out / "robustft_align.json").read_text())
    assert info["family"] == "llama" and sum(info["moved"].values()) > 0
    assert (out / "tokenizer.json").is_file() == (root / "b" / "tokenizer.json").is_file()
    c = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(_out(c, ids), _out(b, ids), rtol=1e-5, atol=1e-5)
    # the same permutations as the in-memory API
    expected, _ = align_state_dicts(a.state_dict(), b.state_dict(), b.config)  # a PretrainedConfig works too
    written = load_all(out)
    assert all(torch.equal(written[k], expected[k]) for k in written)

    merged = tmp_path / "merged"
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(root / "a"), "parameters": {"weight": 1.0}},
            {"model": str(out), "parameters": {"weight": 1.0}},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(merged), "--no-progress"]) == 0
    got = load_all(merged)
    sa = a.state_dict()
    assert all(torch.allclose(got[k], (sa[k] + expected[k]) / 2, atol=1e-7) for k in got)
    LlamaForCausalLM.from_pretrained(merged)


def test_an_mlp_safetensors_file_without_config_aligns(tmp_path):
    a, b = tiny_mlp(0), tiny_mlp(1)
    save_file(a.state_dict(), tmp_path / "a.safetensors")
    (tmp_path / "b").mkdir()
    save_file(b.state_dict(), tmp_path / "b" / "model.safetensors")
    result = align_checkpoints(tmp_path / "a.safetensors", tmp_path / "b", tmp_path / "out")
    assert result.family == "mlp"
    expected, _ = align_state_dicts(a.state_dict(), b.state_dict())
    written = load_all(tmp_path / "out")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)


def test_unalignable_inputs_are_named_and_nothing_is_written(llama_pair, tmp_path, capsys):
    root, a, _ = llama_pair
    save_model(_llama(3, intermediate=48), tmp_path / "wide")
    out = tmp_path / "out"
    args = ["align", "--reference", str(root / "a"), "--out", str(out)]
    assert main([*args, "--model", str(tmp_path / "wide")]) == 2
    assert "shape (32, 64) in reference but (32, 48) in model" in capsys.readouterr().err and not out.exists()

    config = json.loads((root / "a" / "config.json").read_text())
    save_model(_llama(3), tmp_path / "neox")
    (tmp_path / "neox" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    assert main([*args, "--model", str(tmp_path / "neox")]) == 2
    assert "model_type 'gpt_neox' is not an alignable family" in capsys.readouterr().err and not out.exists()

    assert main([*args, "--model", str(root / "a"), "--family", "resnet"]) == 2
    assert "family: 'resnet'" in capsys.readouterr().err and not out.exists()

    with pytest.raises(ValueError, match="inside|is an input|overlap|same"):
        align_checkpoints(root / "a", root / "a", root / "a" / "sub")
    with pytest.raises(UnalignableError, match="not a Linear of one nn.Sequential"):
        align_state_dicts({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)})


@pytest.mark.parametrize("max_iter", ["-5", "0"])
def test_max_iter_below_one_is_refused_before_writing(tmp_path, capsys, max_iter):
    """0 or fewer sweeps would write the model unaligned (rc 0 before): a named error, nothing written."""
    save_file(tiny_mlp(0).state_dict(), tmp_path / "a.safetensors")
    save_file(tiny_mlp(1).state_dict(), tmp_path / "b.safetensors")
    out = tmp_path / "out"
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    args = ["align", "--reference", a, "--model", b, "--out", str(out), "--max-iter", max_iter]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustft align: error: max_iter must be >= 1"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    sd = tiny_mlp(0).state_dict()
    with pytest.raises(ValueError, match="max_iter"):
        align_state_dicts(sd, sd, max_iter=0)
    with pytest.raises(ValueError, match="seed"):
        align_state_dicts(sd, sd, seed="1")


ACTIVATION_INPUTS = {
    "mlp": lambda: torch.randn(64, 8, generator=torch.Generator().manual_seed(3)),
    "llama-mha": lambda: torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3)),
    "llama-gqa": lambda: torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3)),
    "gpt2": lambda: torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3)),
    "bert": lambda: torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_matching_recovers_a_known_permutation_exactly(family):
    """B = A with every permutation group shuffled; matching B's unit activations to A's finds the inverse."""
    build, _ = FAMILIES[family]
    a = build(0)
    sd = a.state_dict()
    spec = permutation_spec({k: tuple(v.shape) for k, v in sd.items()}, _config(a))
    g = torch.Generator().manual_seed(5)
    truth = {k: torch.randperm(n, generator=g) for k, n in spec.sizes.items()}
    b = build(0)
    b.load_state_dict(apply_permutations(spec, truth, sd))
    perms = activation_matching(spec, a, b, ACTIVATION_INPUTS[family]())
    for k, p in perms.items():  # B's unit p[i] is A's unit i: p inverts truth
        assert torch.equal(truth[k][p], torch.arange(len(p))), k
    back, _ = align_models(a, b, "activation", ACTIVATION_INPUTS[family](), family=None)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert not any(m._forward_pre_hooks for m in [*a.modules(), *b.modules()])  # hooks gone


def test_activation_matching_reads_units_where_a_layer_takes_them_as_input():
    m = _gpt2(0)
    spec = permutation_spec({k: tuple(v.shape) for k, v in m.state_dict().items()}, _config(m))
    readers = unit_readers(m, spec)
    assert readers["layer0.mlp"][0] == "transformer.h.0.mlp.c_proj"
    assert readers["layer1.heads"][0] == "transformer.h.1.attn.c_proj"
    with pytest.raises(ValueError, match="data: activation matching needs a data sample"):
        align_models(m, _gpt2(1), "activation")
    with pytest.raises(ValueError, match="method must be"):
        align_models(m, _gpt2(1), "both")
    bad = permutation_spec({"0.weight": (4, 3), "1.weight": (2, 4)})
    with pytest.raises(UnalignableError, match="no Linear/Conv1D of the model reads"):
        unit_readers(torch.nn.Module(), bad)
