"""Tiny local base models and PEFT adapters with random (non-zero) B, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )


def save_base(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(hidden)).save_pretrained(path)
    return path


def make_adapter(base_dir: Path, out: Path, seed: int, model_class=LlamaForCausalLM, **lora_kwargs) -> Path:
    """Save a LoRA adapter on the ``model_class`` base at ``base_dir`` with every factor random (B too)."""
    model = model_class.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    return out


def peft_deltas(
    base_dir: Path, adapters: dict[str, Path], bias: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """adapter name -> module -> ΔW, as PEFT itself computes it (``get_delta_weight``) after loading; with
    ``bias``, Δb = lora_B.bias · scaling instead (what PEFT's merge adds to the base bias)."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    names = list(adapters)
    # PEFT adapter names must not be substrings of "lora_" (a, o, r ...): load them under a prefix
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=f"ad_{names[0]}")
    for n in names[1:]:
        peft_model.load_adapter(adapters[n], adapter_name=f"ad_{n}")
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    prefix = "base_model.model."
    for mod_name, module in peft_model.named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        for n in names:
            key = f"ad_{n}"
            if bias:
                if key in getattr(module, "lora_B", {}) and module.lora_B[key].bias is not None:
                    db = module.lora_B[key].bias * module.scaling[key]
                    out[n][mod_name.removeprefix(prefix)] = db.detach().double()
            elif key in getattr(module, "lora_A", {}) or key in getattr(module, "lora_embedding_A", {}):
                out[n][mod_name.removeprefix(prefix)] = module.get_delta_weight(key).detach().double()
    return out


def save_quantized_base(root, bits: int):
    """A float tiny Llama (hidden 64: bitsandbytes' 4-bit block), the same saved in ``bits`` by bitsandbytes,
    and an adapter on it whose ΔW is ~6% of W (a trained adapter's size, not a random one's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    base = save_base(root / "base", hidden=64)
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=torch.float32)
              if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    LlamaForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu").save_pretrained(
        root / "quantized")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.01))
    model.save_pretrained(root / "adapter")
    return base, root / "quantized", root / "adapter"


def dequantized(weight) -> torch.Tensor:
    """bitsandbytes' own dequantization of a 4-bit or 8-bit weight (float32)."""
    import bitsandbytes as bnb

    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    """A base model and three adapters: different targets, ranks, alphas, rsLoRA and an embedding."""
    root = tmp_path_factory.mktemp("zoo")
    base = save_base(root / "base")
    adapters = {
        "a": make_adapter(base, root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(
            base,
            root / "b",
            2,
            r=6,
            lora_alpha=3,
            target_modules=["q_proj", "o_proj", "up_proj"],
            rank_pattern={"o_proj": 2},
            alpha_pattern={"up_proj": 5},
        ),
        "c": make_adapter(
            base,
            root / "c",
            3,
            r=3,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["v_proj", "down_proj", "embed_tokens"],
        ),
    }
    return base, adapters
