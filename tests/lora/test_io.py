"""Composed adapters, written and re-loaded by PEFT, give ΔW = the requested combination of PEFT's ΔW."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from robustft.lora import compose_adapters, merge_into_base, read_adapter, write_adapter
from tests.lora.conftest import make_adapter, peft_deltas, save_base

TOL = dict(atol=1e-5, rtol=1e-5)


def expected_sum(refs, weights):
    out = {}
    for name, w in weights.items():
        for module, dw in refs[name].items():
            out[module] = out.get(module, 0) + w * dw
    return out


def assert_deltas_equal(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], **TOL, msg=lambda m, mod=module: f"{mod}: {m}")


@pytest.mark.parametrize(
    "weights",
    [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": -1.0}, {"a": 1.0, "b": 1.0, "c": -0.5}, {"c": -1.0}, {"b": 2.5}],
    ids=["add", "subtract", "compose", "negate", "scale"],
)
def test_composed_adapter_loaded_by_peft_has_the_combined_delta(lora_zoo, tmp_path, weights):
    base, paths = lora_zoo
    names = list(weights)
    composed = compose_adapters([read_adapter(paths[n]) for n in names], [weights[n] for n in names])
    out = write_adapter(composed, tmp_path / "out")
    refs = peft_deltas(base, {**{n: paths[n] for n in names}, "out": out})
    assert_deltas_equal(refs["out"], expected_sum(refs, weights))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)


def test_compress_written_adapter_matches_dense_truncated_svd(lora_zoo, tmp_path):
    base, paths = lora_zoo
    weights = {"a": 1.0, "b": 0.7, "c": -0.5}
    adapters = [read_adapter(paths[n]) for n in weights]
    full = write_adapter(compose_adapters(adapters, list(weights.values())), tmp_path / "full")
    low = write_adapter(compose_adapters(adapters, list(weights.values()), rank=2), tmp_path / "r2")
    exact = write_adapter(compose_adapters(adapters, list(weights.values()), rank=13), tmp_path / "r13")
    refs = peft_deltas(base, {"full": full, "r2": low, "r13": exact})
    # rank 13 >= every module's true rank (at most 4 + 6 + 3): exact
    assert_deltas_equal(refs["r13"], refs["full"])
    for module, dense in refs["full"].items():
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        torch.testing.assert_close(refs["r2"][module], (U[:, :2] * S[:2]) @ Vh[:2], **TOL)
    sd = load_file(str(low / "adapter_model.safetensors"))
    assert all(t.shape[0] == 2 for k, t in sd.items() if "lora_A" in k or "lora_embedding_A" in k)


def test_paper_method_is_the_factor_sum(lora_zoo, tmp_path):
    base, paths = lora_zoo
    # two adapters with the same config, as the paper's operators need
    a2 = make_adapter(base, tmp_path / "a2", 11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a, b = read_adapter(paths["a"]), read_adapter(a2)
    out = write_adapter(compose_adapters([a, b], [0.3, -0.7], method="paper"), tmp_path / "paper")
    got = peft_deltas(base, {"p": out})["p"]
    for module, da in a.deltas.items():
        db = b.deltas[module]
        ref = (
            da.scale
            * (0.3 * da.B.double() - 0.7 * db.B.double())
            @ (0.3 * da.A.double() + 0.7 * db.A.double())
        )
        torch.testing.assert_close(got[module], ref, **TOL)


def test_merge_into_base_gives_base_plus_delta(lora_zoo, tmp_path):
    base, paths = lora_zoo
    composed = compose_adapters([read_adapter(paths["a"]), read_adapter(paths["b"])], [1.0, -1.0])
    out = merge_into_base(composed, base, tmp_path / "merged")
    refs = peft_deltas(base, {"a": paths["a"], "b": paths["b"]})
    want = expected_sum(refs, {"a": 1.0, "b": -1.0})
    merged = dict(LlamaForCausalLM.from_pretrained(out).named_parameters())
    original = dict(LlamaForCausalLM.from_pretrained(base).named_parameters())
    for name, w in merged.items():
        module = name.removesuffix(".weight")
        ref = original[name].double() + (want[module] if module in want else 0)
        torch.testing.assert_close(w.double(), ref, **TOL)
    with pytest.raises(FileExistsError):
        merge_into_base(composed, base, out)


def test_bad_inputs_fail_before_writing(lora_zoo, tmp_path):
    base, paths = lora_zoo
    a = read_adapter(paths["a"])
    # a different base model
    other_base = save_base(tmp_path / "other_base", seed=1)
    foreign = read_adapter(make_adapter(other_base, tmp_path / "foreign", 4, r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="different base models"):
        compose_adapters([a, foreign])
    # same base name, different shapes: the error names the module
    wide = read_adapter(
        make_adapter(
            save_base(tmp_path / "wide", hidden=48), tmp_path / "w", 5, r=4, target_modules=["q_proj"]
        )
    )
    wide.config["base_model_name_or_path"] = a.base_model
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        compose_adapters([a, wide])
    with pytest.raises(ValueError, match="unknown method"):
        compose_adapters([a], method="magic")
    with pytest.raises(ValueError, match="rank must be"):
        compose_adapters([a], rank=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_adapter(tmp_path / "nowhere")
    # an existing output is never overwritten unless asked, and stays untouched
    out = write_adapter(a.__class__(a.deltas, a.config, a.kinds), tmp_path / "out")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        write_adapter(compose_adapters([a], [2.0]), out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    write_adapter(compose_adapters([a], [2.0]), out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_ties_recipe_matches_peft_ties_svd(lora_zoo, tmp_path):
    pytest.importorskip("robustft.ops.merge", reason="TIES comes from robustft.ops.merge (the merge piece)")
    from peft import PeftModel

    base, paths = lora_zoo
    a2 = make_adapter(base, tmp_path / "a2", 12, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    composed = compose_adapters(
        [read_adapter(paths["a"]), read_adapter(a2)], method="ties", rank=3, params={"density": 0.4}
    )
    ours = peft_deltas(base, {"t": write_adapter(composed, tmp_path / "ties")})["t"]
    # the peer: PEFT's own TIES + SVD on the same adapters (weights 1, so both weighting conventions agree)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), paths["a"], adapter_name="a")
    model.load_adapter(a2, adapter_name="a2")
    model.add_weighted_adapter(
        ["a", "a2"], [1.0, 1.0], "peft", combination_type="ties_svd", svd_rank=3, density=0.4
    )
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "peft" in getattr(module, "lora_A", {}):
            want = module.get_delta_weight("peft").double()
            torch.testing.assert_close(ours[name.removeprefix("base_model.model.")], want, **TOL)
            checked += 1
    assert checked == len(ours) == 4
    with pytest.raises(ValueError, match="unknown parameter"):
        compose_adapters([read_adapter(paths["a"])], method="ties", params={"densty": 0.4})
    with pytest.raises(ValueError, match="needs parameter"):
        compose_adapters([read_adapter(paths["a"])], method="dare_linear", params={"drop_rate": 0.3})


def test_modules_to_save_heads_follow_the_extras_policy(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    paths = []
    for seed in (1, 2):
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(tmp_path / "bert"),
            LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
        )
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # LoRA factors and the classifier head
                    p.copy_(torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"ad{seed}")
        paths.append(tmp_path / f"ad{seed}")
    adapters = [read_adapter(p) for p in paths]
    assert any("classifier" in k for k in adapters[0].extras)
    with pytest.raises(ValueError, match="classifier"):
        compose_adapters(adapters)
    out = write_adapter(compose_adapters(adapters, [1.0, -1.0], extras="first"), tmp_path / "out")
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tmp_path / "bert"), out)
    first = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tmp_path / "bert"), paths[0]
    )
    head = "classifier.modules_to_save.default.weight"
    torch.testing.assert_close(
        loaded.base_model.model.get_parameter(head), first.base_model.model.get_parameter(head)
    )
    # and its LoRA part is the difference, as PEFT computes the deltas
    first.load_adapter(paths[1], adapter_name="second")
    checked = 0
    refs = dict(first.named_modules())
    for name, mod in loaded.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            ref = refs[name]
            want = ref.get_delta_weight("default") - ref.get_delta_weight("second")
            torch.testing.assert_close(mod.get_delta_weight("default"), want, **TOL)
            checked += 1
    assert checked == 2


@pytest.mark.parametrize("method", ["warp", "nuslerp"])
def test_spherical_compose_is_the_slerp_of_the_dense_deltas(lora_zoo, tmp_path, method):
    """WARP's SLERP on each module's dense ΔW (λ = w_2/(w_1+w_2)), at the default (exact) rank."""
    base, paths = lora_zoo
    a2 = make_adapter(base, tmp_path / "a2", 13, r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"])
    composed = compose_adapters([read_adapter(paths["a"]), read_adapter(a2)], [1.0, 3.0], method=method)
    ours = peft_deltas(base, {"t": write_adapter(composed, tmp_path / "sph")})["t"]
    refs = peft_deltas(base, {"a": paths["a"], "a2": a2})
    for module, got in ours.items():
        x, y = refs["a"][module].double().flatten(), refs["a2"][module].double().flatten()
        om = math.acos((x @ y / (x.norm() * y.norm())).item())
        want = (math.sin(0.25 * om) * x + math.sin(0.75 * om) * y) / math.sin(om)
        torch.testing.assert_close(got.double().flatten(), want, **TOL)
    assert len(ours) == 4
    if method == "nuslerp":
        with pytest.raises(ValueError, match="at most 2 adapters"):
            compose_adapters([read_adapter(paths["a"])] * 3, method=method)
