"""LoRA in, LoRA out: TIES/DARE/DELLA/TSV-M on PEFT adapters give one PEFT adapter of rank r whose ΔW (loaded
by PEFT) is the best rank-r approximation of the dense merge of PEFT's own ΔW_i, with the truncation error
reported per module; rsLoRA, rank/alpha patterns, lora_bias and different targets handled exactly; DoRA and
the other PEFT LoRA variants refused; and where PEFT's ``add_weighted_adapter`` is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

from robustft.lora import compose_adapters, read_adapter, write_adapter
from robustft.lora.compose import DENSE_METHODS, merge_into_base
from robustft.merge.engine import tensor_seed
from robustft.ops import merge as ops
from tests.lora.conftest import dequantized, make_adapter, peft_deltas, save_base, save_quantized_base

# lora_bias on the bias-free Llama layers: PEFT warns that it could not merge into the base (not done here),
# and its loader takes the 1-D lora_B.bias for an ungathered ZeRO-3/FSDP shard (a false alarm)
pytestmark = [
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*LoRA tensor.*invalid shape"),
]
RANK = 3
WEIGHTS = [1.0, 0.7, -0.5]
SEED = 5

#: method -> (compose params, the dense merge of a list of same-shape tensors, from robustft.ops)
METHODS = {
    "ties": ({"density": 0.5}, lambda ts, seed: ops.ties(ts, 0.5, WEIGHTS)),
    "dare_linear": (
        {"drop_rate": 0.3, "seed": SEED},  # robustft's alias of density 0.7
        lambda ts, seed: ops.dare_merge(ts, [0.7] * 3, seed, WEIGHTS, method="linear"),
    ),
    "dare_ties": (
        {"density": 0.7, "seed": SEED},
        lambda ts, seed: ops.dare_merge(ts, [0.7] * 3, seed, WEIGHTS, method="ties"),
    ),
    "della": (
        {"density": 0.5, "epsilon": 0.1, "seed": SEED},
        lambda ts, seed: ops.della_merge(ts, [0.5] * 3, [0.1] * 3, seed, WEIGHTS, "ties", True, True),
    ),
    "della_linear": (
        {"density": 0.5, "epsilon": 0.1, "seed": SEED},
        lambda ts, seed: ops.della_merge(ts, [0.5] * 3, [0.1] * 3, seed, WEIGHTS, "linear", True, False),
    ),
    "tsv_m": ({}, lambda ts, seed: ops.tsv_merge(ts, WEIGHTS, None)),
}


@pytest.fixture(scope="module")
def variant_zoo(tmp_path_factory):
    """Three adapters of one base: rsLoRA, rank_pattern, alpha_pattern, lora_bias, different targets."""
    root = tmp_path_factory.mktemp("variants")
    base = save_base(root / "base")
    adapters = {
        "a": make_adapter(
            base,
            root / "a",
            21,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            lora_bias=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 3},
        ),
        "b": make_adapter(
            base,
            root / "b",
            22,
            r=6,
            lora_alpha=3,
            target_modules=["q_proj", "o_proj", "up_proj"],
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 5},
        ),
        "c": make_adapter(
            base,
            root / "c",
            23,
            r=3,
            lora_alpha=4,
            use_rslora=True,
            alpha_pattern={"v_proj": 7},
            target_modules=["v_proj", "q_proj", "down_proj"],
        ),
    }
    return base, adapters


@pytest.fixture(scope="module")
def zoo_refs(variant_zoo):
    """PEFT's own ΔW_i and Δb_i of the variant zoo's adapters."""
    base, paths = variant_zoo
    return peft_deltas(base, paths), peft_deltas(base, paths, bias=True)


def _stacked(refs: dict, module: str, like: torch.Tensor) -> list[torch.Tensor]:
    """The adapters' tensors of ``module`` in order (float32, as robustft computes), zero where absent."""
    return [refs[n][module].float() if module in refs[n] else torch.zeros_like(like).float() for n in "abc"]


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_of_lora_adapters_is_the_best_rank_r_of_the_dense_merge(
    variant_zoo, zoo_refs, tmp_path, method
):
    base, paths = variant_zoo
    params, merge = METHODS[method]
    composed = compose_adapters(
        [read_adapter(paths[n]) for n in "abc"], WEIGHTS, method=method, rank=RANK, params=params
    )
    out = write_adapter(composed, tmp_path / method)
    refs, bias_refs = zoo_refs
    got = peft_deltas(base, {"out": out})["out"]
    modules = set().union(*[refs[n] for n in "abc"])
    assert set(got) == modules == set(composed.truncation_errors)  # the union of the targets
    truncated = 0
    for module in sorted(modules):
        like = next(refs[n][module] for n in "abc" if module in refs[n])
        dense = merge(_stacked(refs, module, like), tensor_seed(SEED, f"{module}.weight")).double()
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]  # Eckart-Young
        torch.testing.assert_close(
            got[module], best, atol=2e-5, rtol=1e-4, msg=lambda m, mod=module: f"{mod}: {m}"
        )
        error = float((dense - best).norm() / dense.norm())
        assert composed.truncation_errors[module] == pytest.approx(error, rel=1e-4, abs=1e-6), module
        truncated += error > 1e-3
    assert truncated >= len(modules) // 2  # rank 3 really truncates
    saved = json.loads((out / "truncation_errors.json").read_text())
    assert saved == pytest.approx(composed.truncation_errors)
    # lora_bias (adapter a only): the bias deltas merged by the same method, zero for b and c, exact
    got_bias = peft_deltas(base, {"out": out}, bias=True)["out"]
    assert set(bias_refs["a"]) == {m for m in modules if m.endswith(("q_proj", "v_proj"))}
    assert set(got_bias) == modules  # lora_bias is adapter-wide in PEFT: zeros elsewhere
    for module in sorted(modules):
        like = torch.zeros(got[module].shape[0])
        stacked = [bias_refs[n][module].float() if module in bias_refs[n] else like for n in "abc"]
        want = merge(stacked, tensor_seed(SEED, f"{module}.bias")).double()
        torch.testing.assert_close(got_bias[module], want, atol=1e-6, rtol=1e-5)


def test_exact_compose_with_rank_reports_the_truncation_error(variant_zoo, zoo_refs, tmp_path):
    base, paths = variant_zoo
    composed = compose_adapters([read_adapter(paths[n]) for n in "abc"], WEIGHTS, rank=2)
    refs = zoo_refs[0]
    got = peft_deltas(base, {"o": write_adapter(composed, tmp_path / "o")})["o"]
    for module, delta in got.items():
        dense = sum(w * refs[n][module] for w, n in zip(WEIGHTS, "abc", strict=True) if module in refs[n])
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        torch.testing.assert_close(delta, best, atol=1e-5, rtol=1e-5)
        want = float((dense - best).norm() / dense.norm())
        assert composed.truncation_errors[module] == pytest.approx(want, rel=1e-4, abs=1e-6)
    # without a rank nothing is truncated and nothing is reported
    assert compose_adapters([read_adapter(paths["a"])]).truncation_errors == {}


def test_peft_add_weighted_adapter_is_wrong_for_rslora_and_lora_bias(variant_zoo, tmp_path):
    """PEFT's ``add_weighted_adapter`` keeps ``use_rslora`` of the first adapter in the new config while it
    writes factors whose product is already the whole ΔW (``lora_alpha = r``), so the new adapter's ΔW is
    √r times too large; and it leaves the new ``lora_B`` bias at zero, dropping Δb. robustft is exact."""
    from peft import PeftModel
    from peft.utils.merge_utils import ties
    from transformers import LlamaForCausalLM

    base, paths = variant_zoo
    a2 = make_adapter(
        base,
        tmp_path / "a2",
        31,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        lora_bias=True,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 3},
    )
    refs = peft_deltas(base, {"a": paths["a"], "a2": a2})
    bias_refs = peft_deltas(base, {"a": paths["a"], "a2": a2}, bias=True)
    # TIES at weights 1, where PEFT's (sign of the unweighted sum) and mergekit's conventions agree; full
    # rank 32, as TIES makes a full-rank ΔW
    for combination, kwargs, method, params, weights in [
        ("svd", {"svd_rank": 8}, "exact", {}, [1.0, -0.6]),
        ("cat", {}, "exact", {}, [1.0, -0.6]),
        (
            "ties_svd",
            {"svd_rank": 32, "density": 0.5, "svd_full_matrices": False},
            "ties",
            {"density": 0.5},
            [1.0, 1.0],
        ),
    ]:
        model = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(base), paths["a"], adapter_name="a"
        )
        model.load_adapter(a2, adapter_name="a2")
        model.add_weighted_adapter(["a", "a2"], weights, "new", combination_type=combination, **kwargs)
        rank = kwargs.get("svd_rank", 8)
        ours = compose_adapters(
            [read_adapter(paths["a"]), read_adapter(a2)], weights, method=method, rank=rank, params=params
        )
        got = peft_deltas(base, {"o": write_adapter(ours, tmp_path / combination)})["o"]
        got_bias = peft_deltas(base, {"o": tmp_path / combination}, bias=True)["o"]
        checked = 0
        for name, module in model.named_modules():
            if not (hasattr(module, "get_delta_weight") and "new" in getattr(module, "lora_A", {})):
                continue
            key = name.removeprefix("base_model.model.")
            peft_delta = module.get_delta_weight("new").double()
            stacked = [refs["a"][key].float(), refs["a2"][key].float()]
            stacked_bias = [bias_refs["a"][key].float(), bias_refs["a2"][key].float()]
            if method == "exact":
                exact = (weights[0] * stacked[0] + weights[1] * stacked[1]).double()
                want_bias = (weights[0] * stacked_bias[0] + weights[1] * stacked_bias[1]).double()
            else:  # PEFT's TIES on PEFT's ΔW_i, as its ties_svd computes before the SVD
                exact = ties(stacked, torch.tensor(weights), 0.5, "total").double()
                want_bias = ties(stacked_bias, torch.tensor(weights), 0.5, "total").double()
            # PEFT: √r times the merge (its scaling r/√r, rsLoRA kept from the inputs), robustft: the merge
            assert module.scaling["new"] == pytest.approx(math.sqrt(rank))
            torch.testing.assert_close(peft_delta, math.sqrt(rank) * exact, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[key], exact, atol=1e-5, rtol=1e-4)
            # Δb: PEFT leaves the new lora_B bias at zero, robustft merges the bias deltas
            assert torch.count_nonzero(module.lora_B["new"].bias) == 0
            torch.testing.assert_close(got_bias[key], want_bias, atol=1e-6, rtol=1e-5)
            assert want_bias.abs().max() > 0.05
            checked += 1
        assert checked == 4, combination


def test_dora_and_other_peft_variants_are_refused_naming_adapter_module_option(lora_zoo, tmp_path, capsys):
    from robustft.cli import main

    base, paths = lora_zoo
    dora = make_adapter(base, tmp_path / "dora", 41, r=2, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"dora.*model\.layers\.0\.self_attn\.q_proj.*use_dora=True") as err:
        read_adapter(dora)
    assert "not s·B·A" in str(err.value)
    out = tmp_path / "out"
    assert main(["lora", "compose", "--adapters", str(paths["a"]), str(dora), "--out", str(out)]) == 2
    assert "use_dora=True" in capsys.readouterr().err and not out.exists()
    # options PEFT tags as LoRA variants, and initialisations that change the base weights
    plain = make_adapter(base, tmp_path / "plain", 42, r=2, target_modules=["v_proj"])
    config = json.loads((plain / "adapter_config.json").read_text())
    for option, value in [("alora_invocation_tokens", [1, 2]), ("init_lora_weights", "olora")]:
        (plain / "adapter_config.json").write_text(
            json.dumps({**config, "task_type": "CAUSAL_LM", option: value})
        )
        with pytest.raises(ValueError, match=rf"plain.*model\.layers\.0\.self_attn\.v_proj.*{option}="):
            read_adapter(plain)


def test_lora_merge_inputs_are_checked_before_anything_is_written(variant_zoo, lora_zoo, tmp_path, capsys):
    from robustft.cli import main

    _, paths = variant_zoo
    a, c = read_adapter(paths["a"]), read_adapter(paths["c"])
    # lora_bias (a) and an embedding LoRA (the other zoo's c, same base name) cannot share one PEFT adapter
    embedded = read_adapter(lora_zoo[1]["c"])
    embedded.config["base_model_name_or_path"] = a.base_model
    with pytest.raises(ValueError, match=r"lora_bias=True.*embed_tokens.*embedding"):
        compose_adapters([a, embedded], method="ties", params={"density": 0.5})
    with pytest.raises(ValueError, match=r"density \+/- epsilon must lie in \(0, 1\)"):
        compose_adapters([a, c], method="della", params={"density": 0.5, "epsilon": 0.5, "seed": 0})
    with pytest.raises(ValueError, match="drop_rate .* not both"):
        compose_adapters([a, c], method="dare_ties", params={"density": 0.5, "drop_rate": 0.5, "seed": 0})
    # Iso-C/CTS flatten the spectrum over all min(m, n) directions: ill-posed on low-rank deltas
    with pytest.raises(ValueError, match="merge method 'iso_c' does not apply to LoRA deltas"):
        compose_adapters([a, c], method="iso_c")
    with pytest.raises(ValueError, match="'sce' takes no per-adapter weights"):
        compose_adapters([a, c], [1.0, -1.0], method="sce")
    with pytest.raises(ValueError, match=r"tsv_m.*sv_reduction x number of models must be <= 1"):
        compose_adapters([a, c], method="tsv_m", params={"sv_reduction": 0.8})
    out = tmp_path / "out"
    argv = ["lora", "compose", "--adapters", str(paths["a"]), str(paths["c"]), "--out", str(out)]
    assert (
        main([*argv, "--method", "della", "--param", "density=0.5", "--param", "epsilon=-1", "--seed", "0"])
        == 2
    )
    assert "--param epsilon must be" in capsys.readouterr().err
    assert main([*argv, "--method", "tsv_m", "--param", "alpha"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert not out.exists()
    # and the CLI reports the errors it wrote
    assert main([*argv, "--method", "tsv_m", "--param", "sv_reduction=0.5", "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "truncation_errors.json").read_text())
    assert "truncation error" in printed and all(f"  {m}: " in printed for m in saved)
    python = compose_adapters([a, c], method="tsv_m", rank=2, params={"sv_reduction": 0.5}, progress=True)
    assert saved == pytest.approx(python.truncation_errors)
    assert "merging LoRA modules" in capsys.readouterr().err  # the progress bar, one step per module


def test_row_wise_merges_see_the_base_weight_layout(lora_zoo, tmp_path):
    """DELLA ranks entries within rows: an embedding's B·A is its weight transposed (PEFT's
    ``get_delta_weight`` transposes it back); the merge must see the weight's rows, as ``robustft merge``."""
    base, paths = lora_zoo
    weights = [1.0, -0.8]
    composed = compose_adapters(
        [read_adapter(paths["a"]), read_adapter(paths["c"])],
        weights,
        method="della",
        rank=RANK,
        params={"density": 0.4, "epsilon": 0.2, "seed": SEED},
    )
    got = peft_deltas(base, {"o": write_adapter(composed, tmp_path / "o")})["o"]
    refs = peft_deltas(base, {"a": paths["a"], "c": paths["c"]})
    assert "model.embed_tokens" in got
    for module, delta in got.items():
        like = next(refs[n][module] for n in "ac" if module in refs[n])
        stacked = [
            refs[n][module].float() if module in refs[n] else torch.zeros_like(like).float() for n in "ac"
        ]
        seed = tensor_seed(SEED, f"{module}.weight")
        dense = ops.della_merge(stacked, [0.4] * 2, [0.2] * 2, seed, weights, "ties", True, True).double()
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        torch.testing.assert_close(delta, best, atol=2e-5, rtol=1e-4, msg=lambda m, mod=module: f"{mod}: {m}")


def test_merge_into_a_base_without_biases_refuses_lora_bias(variant_zoo, tmp_path):
    from robustft.lora import merge_into_base

    base, paths = variant_zoo
    composed = compose_adapters([read_adapter(paths["a"])], rank=2)
    with pytest.raises(ValueError, match=r"q_proj.*lora_bias.*no bias"):
        merge_into_base(composed, base, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_base_with_biases_adds_the_merged_bias_deltas(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertConfig, BertModel

    from robustft.lora import merge_into_base

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    paths = []
    for seed, rslora in ((1, True), (2, False)):
        model = get_peft_model(
            BertModel.from_pretrained(tmp_path / "bert"),
            LoraConfig(
                r=2, lora_alpha=4, use_rslora=rslora, lora_bias=True, target_modules=["query", "value"]
            ),
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"ad{seed}")
        paths.append(tmp_path / f"ad{seed}")
    composed = compose_adapters([read_adapter(p) for p in paths], [1.0, -0.5])
    out = merge_into_base(composed, tmp_path / "bert", tmp_path / "merged")
    merged = dict(BertModel.from_pretrained(out).named_parameters())
    ref = PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "bert"), paths[0], adapter_name="x")
    ref.load_adapter(paths[1], adapter_name="y")
    checked = 0
    for name, module in ref.named_modules():
        if hasattr(module, "get_delta_weight") and "x" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            delta_b = [module.lora_B[a].bias * module.scaling[a] for a in "xy"]
            want = module.base_layer.bias + delta_b[0] - 0.5 * delta_b[1]
            torch.testing.assert_close(merged[f"{key}.bias"], want, atol=1e-5, rtol=1e-5)
            want_w = (
                module.base_layer.weight + module.get_delta_weight("x") - 0.5 * module.get_delta_weight("y")
            )
            torch.testing.assert_close(merged[f"{key}.weight"], want_w, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == 2


OTHER_METHODS = sorted(
    set(DENSE_METHODS) - set(METHODS) - {"warp", "nuslerp", "multislerp", "karcher"}  # spherical: test_io
)


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_every_other_registry_method_on_lora_deltas(variant_zoo, zoo_refs, tmp_path, method):
    """The rest of the registry's LoRA methods at their defaults: the tensor function of the registry on
    PEFT's ΔW_i (the plumbing: scales, zeros, layout, truncation and its error)."""
    from robustft.merge.registry import METHODS as REGISTRY
    from robustft.merge.registry import MergeInputs

    base, paths = variant_zoo
    spec = REGISTRY[method]
    weights = WEIGHTS if "weight" in spec.model_params else [1.0] * 3
    composed = compose_adapters([read_adapter(paths[n]) for n in "abc"], weights, method=method, rank=RANK)
    got = peft_deltas(base, {"o": write_adapter(composed, tmp_path / "o")})["o"]
    refs = zoo_refs[0]
    gparams = {k: p.default for k, p in spec.global_params.items()}
    mparams = [{**{k: p.default for k, p in spec.model_params.items()}, "weight": w} for w in weights]
    assert set(got) == set(composed.truncation_errors) and len(got) == 10
    for module, delta in got.items():
        like = next(refs[n][module] for n in "abc" if module in refs[n])
        dense = spec.fn(MergeInputs(_stacked(refs, module, like), gparams, mparams)).double()
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        torch.testing.assert_close(delta, best, atol=2e-5, rtol=1e-4, msg=lambda m, mod=module: f"{mod}: {m}")
        error = float((dense - best).norm() / dense.norm()) if dense.norm() > 0 else 0.0
        assert composed.truncation_errors[module] == pytest.approx(error, rel=1e-4, abs=1e-6), module


def test_fan_in_fan_out_layers_are_merged_in_the_weight_layout(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): PEFT's ΔW is (B·A)ᵀ there, and DELLA's row ranks follow it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    ).save_pretrained(tmp_path / "gpt2")
    paths = []
    for seed in (1, 2):
        model = get_peft_model(
            GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
            LoraConfig(r=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"ad{seed}")
        paths.append(tmp_path / f"ad{seed}")
    params = {"density": 0.4, "epsilon": 0.2, "seed": SEED}
    composed = compose_adapters(
        [read_adapter(p) for p in paths], [1.0, 0.5], method="della", rank=64, params=params
    )
    write_adapter(composed, tmp_path / "out")
    ref = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), paths[0], adapter_name="x"
    )
    ref.load_adapter(paths[1], adapter_name="y")
    ref.load_adapter(tmp_path / "out", adapter_name="o")
    checked = 0
    for name, module in ref.named_modules():
        if hasattr(module, "get_delta_weight") and "o" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            stacked = [module.get_delta_weight(a).detach() for a in "xy"]
            assert stacked[0].shape == module.base_layer.weight.shape  # (in, out)
            seed = tensor_seed(SEED, f"{key}.weight")
            want = ops.della_merge(stacked, [0.4] * 2, [0.2] * 2, seed, [1.0, 0.5], "ties", True, True)
            torch.testing.assert_close(module.get_delta_weight("o").detach(), want, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == 2


# -- quantized bases (QLoRA) ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_into_a_quantized_base_is_its_dequantized_weights_plus_the_delta(tmp_path, bits):
    """What the QLoRA model computes (dequantized W + s·B·A), saved as a float model without bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    base, quantized, adapter = save_quantized_base(tmp_path, bits)
    out = merge_into_base(read_adapter(adapter), quantized, tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # the base's dtype; no uint8/int8
    deltas = {f"{m}.weight": d.float() for m, d in peft_deltas(base, {"a": adapter})["a"].items()}
    q = LlamaForCausalLM.from_pretrained(quantized, device_map="cpu")
    merged = dict(LlamaForCausalLM.from_pretrained(out).named_parameters())
    expected = {n: (dequantized(p) if p.dtype in (torch.uint8, torch.int8) else p.detach().float())
                for n, p in q.named_parameters()}
    assert set(merged) == set(expected) and set(deltas) <= set(merged)
    for n, w in merged.items():
        torch.testing.assert_close(w.detach(), expected[n] + deltas.get(n, 0), rtol=1e-6, atol=1e-7, msg=n)


def test_peft_merge_into_a_4bit_base_loses_the_delta_robustft_keeps(tmp_path):
    """peft#2105 / transformers#31293: merging into the Linear4bit re-quantizes W + ΔW, rounding ΔW away."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, quantized, adapter = save_quantized_base(tmp_path, 4)
    deltas = peft_deltas(base, {"a": adapter})["a"]
    peft_merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(quantized, device_map="cpu"),
                                            adapter).merge_and_unload()
    start = dict(LlamaForCausalLM.from_pretrained(quantized, device_map="cpu").named_modules())
    ours = dict(LlamaForCausalLM.from_pretrained(
        merge_into_base(read_adapter(adapter), quantized, tmp_path / "merged")).named_modules())
    peft_modules = dict(peft_merged.named_modules())
    for module, delta in deltas.items():
        want = dequantized(start[module].weight) + delta.float()
        lost = (dequantized(peft_modules[module].weight) - want).norm() / delta.norm()
        kept = (ours[module].weight.detach() - want).norm() / delta.norm()
        assert lost > 0.5 and kept < 1e-6, (module, lost, kept)


def test_merge_into_a_base_of_another_quantization_is_refused_by_name(lora_zoo, tmp_path):
    import shutil

    base, paths = lora_zoo
    shutil.copytree(base, tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq.*only bitsandbytes"):
        merge_into_base(read_adapter(paths["a"]), tmp_path / "gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()
