"""SALSA (Chegini et al., 2024): the DPO reference is a weight soup of two SFT models, made by robustft merge.

The reference log-probs TRL's DPOTrainer computes (its precompute pass: what the loss reads) equal those of a
model built independently at the mean of the two SFT state dicts (torch, no robustft code), and differ from
either SFT model's."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from tests.callbacks.trl_helpers import completion_logps, preference_data  # noqa: E402


def sft_stand_in(base: str, out, seed: int) -> dict[str, torch.Tensor]:
    """An "SFT checkpoint" of the tiny base: its weights moved by seeded noise, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_dpo_reference_is_the_soup_of_two_sft_models(tiny_path, tmp_path):  # noqa: F811
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from robustft.merge import merge_checkpoints, parse_recipe

    sft = [sft_stand_in(tiny_path, tmp_path / f"sft{i}", seed=i) for i in range(2)]
    recipe = parse_recipe({"merge_method": "linear", "models": [str(tmp_path / f"sft{i}") for i in range(2)]})
    merge_checkpoints(recipe, tmp_path / "soup", progress=False)

    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=8, max_steps=1,
                         report_to=[], use_cpu=True, bf16=False, beta=0.5, disable_tqdm=True,
                         precompute_ref_log_probs=True)  # TRL's own pass over the data with its reference
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "sft0"),  # the policy starts at one SFT model
        ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / "soup"), args=args,
        train_dataset=preference_data(), processing_class=AutoTokenizer.from_pretrained(tiny_path),
    )
    batch = next(iter(trainer.get_train_dataloader()))  # with the reference log-probs the DPO loss reads
    got = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])

    # independent: a model built from the config, loaded with the torch mean of the two SFT state dicts
    independent = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_path))
    independent.load_state_dict({n: (sft[0][n] + sft[1][n]) / 2 for n in sft[0]})
    with torch.no_grad():
        expected = completion_logps(independent.eval(), batch)
        ends = [completion_logps(AutoModelForCausalLM.from_pretrained(tmp_path / f"sft{i}").eval(), batch)
                for i in range(2)]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all((got - e).abs().max() > 1e-3 for e in ends)  # the soup, not either SFT model


def test_peft_reference_is_base_plus_the_soup_adapter(tiny_path, tmp_path):  # noqa: F811
    """PEFT: two SFT adapters on one base -> their exact mean by robustft lora compose -> the policy starts at
    that adapter, and TRL's "ref" copy of it is the reference: log-probs equal those of the base with
    W + (ΔW_1 + ΔW_2)/2 folded in densely (torch, from the two adapters' factors)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from robustft.lora import compose_adapters, read_adapter, write_adapter

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    deltas = []
    for i in range(2):  # two "SFT adapters": random factors, seeded
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), config)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"sft{i}")
        named = dict(model.named_parameters())
        deltas.append({n.replace(".lora_A.default.weight", ".weight").replace("base_model.model.", ""):
                       2.0 * named[n.replace("lora_A", "lora_B")] @ named[n]  # scale lora_alpha / r = 2
                       for n in named if "lora_A" in n})
    soup = compose_adapters([read_adapter(tmp_path / f"sft{i}") for i in range(2)], weights=[0.5, 0.5])
    write_adapter(soup, tmp_path / "soup")

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path / "soup",
                                       is_trainable=True)
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=8, max_steps=1,
                         report_to=[], use_cpu=True, bf16=False, beta=0.5, disable_tqdm=True,
                         precompute_ref_log_probs=True)
    trainer = trl.DPOTrainer(model=policy, args=args, train_dataset=preference_data(),
                             processing_class=AutoTokenizer.from_pretrained(tiny_path))
    assert "ref" in trainer.model.peft_config and trainer.ref_model is None  # no copy of the base model
    batch = next(iter(trainer.get_train_dataloader()))
    got = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])

    dense = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, d in deltas[0].items():
            params[name].add_((d + deltas[1][name]) / 2)
        expected = completion_logps(dense, batch)
        base = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_path).eval(), batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
