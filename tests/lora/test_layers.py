"""robustft.lora.layers against PEFT itself: its live layers, its parameter names, its saved keys."""

from __future__ import annotations

import ast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from transformers import LlamaForCausalLM

from robustft.lora import layers
from tests.lora.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"])
    return get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg)


def test_lora_layers_are_peft_lora_layers(peft_model):
    want = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers.lora_layers(peft_model)) == want and want


def test_b_factors_and_their_a_partners_by_name(peft_model):
    names = {n for n, _ in peft_model.named_parameters()}
    b = {n for n in names if layers.is_lora_b(n)}
    assert b == {n for n in names if ".lora_B." in n or ".lora_embedding_B." in n}
    a = {n for n in names if ".lora_A." in n or ".lora_embedding_A." in n}
    assert {layers.lora_a_name(n) for n in b} == a


def test_saved_keys_parse_as_peft_writes_them(peft_model):
    sd = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sd
    modules = set(layers.lora_layers(peft_model))
    for key in sd:
        module, factor, kind = layers.parse_factor_key(key)
        assert module in modules, key
        assert kind == ("embedding" if "embed_tokens" in module else "linear"), key
        assert key.endswith((f"lora_{factor}.weight", f"lora_embedding_{factor}")), key
        assert layers.mentions_lora(key)
    assert layers.parse_factor_key("model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert layers.parse_factor_key("model.layers.0.self_attn.q_proj.weight") is None


def test_lora_delta_is_peft_delta_weight(peft_model):
    linear = [m for m in layers.lora_layers(peft_model).values() if "default" in m.lora_A]
    assert linear
    for layer in linear:
        want = layer.get_delta_weight("default").float()
        torch.testing.assert_close(layers.lora_delta(layer, "default"), want)


def test_module_does_not_import_peft():
    tree = ast.parse(open(layers.__file__).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(str(m).split(".")[0] in {"peft", "transformers"} for m in names), names


def _two_adapters(use_dora=False):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0,
                     use_dora=use_dora)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), cfg)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                                          lora_dropout=0.0, use_dora=use_dora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, as after some training
                p.normal_(0, 0.1)
    model.base_model.set_adapter(["default", "other"])
    return model


def test_low_rank_factors_multiply_to_the_sum_of_the_active_deltas():
    model = _two_adapters()
    found = layers.lora_layers(model)
    assert found
    for name, layer in found.items():
        assert layer.active_adapters == ["default", "other"]
        s, a = layers.low_rank_factors(layer)
        want = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        torch.testing.assert_close(s @ a, want, rtol=1e-6, atol=1e-7, msg=name)


def test_low_rank_factors_refuse_dora():
    model = _two_adapters(use_dora=True)
    assert all(layers.low_rank_factors(layer) is None for layer in layers.lora_layers(model).values())


def test_is_peft_model_is_true_for_peft_models_only():
    """A PeftModel (it has ``disable_adapter()``) is one; a transformers model (its own adapter mixin has
    ``disable_adapters()``) and a plain module are not."""
    from robustft.lora.layers import is_peft_model
    from tests.tiny import tiny_llama

    assert is_peft_model(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])))
    assert not is_peft_model(tiny_llama()) and not is_peft_model(torch.nn.Linear(2, 2))
