"""LoRA on fused MoE expert weights (PEFT ``target_parameters``) through every ``robustft lora`` path, against
PEFT's own ``get_delta_weight`` / ``merge_and_unload`` on a tiny Mixtral."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import MixtralForCausalLM

from robustft.lora.compose import compose_adapters, merge_into_base
from robustft.lora.io import read_adapter, write_adapter
from tests.lora.conftest import make_adapter
from tests.tiny import tiny_mixtral_folder

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_moe_adapter(base, out, seed: int, **kwargs):
    """A PEFT adapter on the tiny Mixtral at ``base`` with every factor random."""
    return make_adapter(base, out, seed, MixtralForCausalLM,
                        **{"target_modules": [], "target_parameters": EXPERTS, **kwargs})


def merged_state(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own ``merge_and_unload`` of ``adapter`` on ``base`` (the live, fused parameters)."""
    model = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base), str(adapter))
    return {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = tiny_mixtral_folder(root / "base")
    a = make_moe_adapter(base, root / "a", 1, r=2, lora_alpha=4)
    b = make_moe_adapter(base, root / "b", 2, r=3, lora_alpha=2, use_rslora=True,
                         target_modules=["q_proj"], rank_pattern={"q_proj": 5})
    return root, base, a, b


def test_read_splits_each_expert_as_peft_computes_it(moe):
    _, base, a, _ = moe
    adapter = read_adapter(a)
    model = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base), str(a))
    experts = model.base_model.model.model.layers[1].mlp.experts
    ref = {"model.layers.1.mlp.experts.base_layer": experts.base_layer.get_delta_weight("default"),  # gate_up
           "model.layers.1.mlp.experts": experts.get_delta_weight("default")}  # down_proj
    for path, delta in ref.items():
        assert delta.shape[0] == 4
        for e in range(4):
            got = adapter.deltas[f"{path}[{e}]"].dense()
            torch.testing.assert_close(got.double(), delta[e].double(), rtol=1e-5, atol=1e-6)
    assert adapter.kinds["model.layers.1.mlp.experts[0]"] == "parameter"


def test_compose_weighted_equals_peft_merges(moe):
    root, base, a, b = moe
    composed = compose_adapters([read_adapter(a), read_adapter(b)], [0.7, -1.3])
    out = write_adapter(composed, root / "composed", overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] == sorted(EXPERTS)
    got = merged_state(base, out)
    start = {k: v.double() for k, v in MixtralForCausalLM.from_pretrained(base).state_dict().items()}
    ma, mb = merged_state(base, a), merged_state(base, b)
    changed = 0
    for k, w in got.items():
        ref = start[k] + 0.7 * (ma[k] - start[k]) - 1.3 * (mb[k] - start[k])
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-5, msg=k)
        changed += not torch.equal(ma[k], start[k]) or not torch.equal(mb[k], start[k])
    assert changed == 2 * 2 + 2  # gate_up_proj and down_proj in two layers, q_proj in two layers


def test_compress_is_the_best_rank_per_expert(moe):
    root, base, a, b = moe
    composed = compose_adapters([read_adapter(a), read_adapter(b)], rank=2)
    out = write_adapter(composed, root / "compressed", overwrite=True)
    model = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base), str(out))
    full = compose_adapters([read_adapter(a), read_adapter(b)])
    experts = model.base_model.model.model.layers[0].mlp.experts
    delta = experts.get_delta_weight("default").double()  # down_proj, every expert
    for e in range(4):
        dense = full.deltas[f"model.layers.0.mlp.experts[{e}]"].dense().double()
        U, S, Vh = torch.linalg.svd(dense)
        torch.testing.assert_close(delta[e], (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-5, atol=1e-6)


def test_merge_into_base_equals_peft_merge_and_unload(moe):
    root, base, a, _ = moe
    out = merge_into_base(compose_adapters([read_adapter(a)], [2.0]), base, root / "merged")
    got = MixtralForCausalLM.from_pretrained(out).state_dict()
    start = {k: v.double() for k, v in MixtralForCausalLM.from_pretrained(base).state_dict().items()}
    ref = merged_state(base, a)
    for k, w in got.items():
        torch.testing.assert_close(w.double(), start[k] + 2 * (ref[k] - start[k]), rtol=1e-5, atol=1e-5)


def test_cli_scale_and_merge_into(moe, tmp_path):
    from robustft.cli import main

    root, base, a, _ = moe
    assert main(["lora", "scale", str(a), "--factor", "0.5", "--out", str(tmp_path / "half")]) == 0
    got = merged_state(base, tmp_path / "half")
    start = {k: v.double() for k, v in MixtralForCausalLM.from_pretrained(base).state_dict().items()}
    ref = merged_state(base, a)
    for k in got:
        torch.testing.assert_close(got[k], start[k] + 0.5 * (ref[k] - start[k]), rtol=1e-5, atol=1e-5)
    assert main(["lora", "negate", str(a), "--out", str(tmp_path / "neg"), "--merge-into", str(base)]) == 0
    neg = MixtralForCausalLM.from_pretrained(tmp_path / "neg").state_dict()
    for k in got:
        torch.testing.assert_close(neg[k].double(), start[k] - (ref[k] - start[k]), rtol=1e-5, atol=1e-5)


def test_adapters_on_different_parameters_are_refused(moe, tmp_path):
    _, base, a, _ = moe
    other = make_moe_adapter(base, tmp_path / "down", 3, r=2, target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="target_parameters"):
        compose_adapters([read_adapter(a), read_adapter(other)])


def test_merge_into_a_base_with_other_experts_is_refused_before_writing(moe, tmp_path):
    _, _, a, _ = moe
    other = tiny_mixtral_folder(tmp_path / "three", experts=3)
    with pytest.raises(ValueError, match=r"expert 3 does not fit parameter 'model.layers.0.mlp.experts"):
        merge_into_base(read_adapter(a), other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_router_as_a_target_parameter(moe, tmp_path):
    """The router's 2-D ``mlp.gate.weight`` beside the fused experts: one "expert" (E = 1), exact too."""
    _, base, _, _ = moe
    ad = make_moe_adapter(base, tmp_path / "router", 4, r=2, lora_alpha=2,
                          target_parameters=["mlp.gate.weight", *EXPERTS])
    adapter = read_adapter(ad)
    assert {"model.layers.0.mlp.gate[0]", "model.layers.0.mlp.experts[3]"} <= set(adapter.deltas)
    out = write_adapter(compose_adapters([adapter], [-0.5]), tmp_path / "half", overwrite=True)
    got, ref = merged_state(base, out), merged_state(base, ad)
    start = {k: v.double() for k, v in MixtralForCausalLM.from_pretrained(base).state_dict().items()}
    assert not torch.equal(ref["model.layers.0.mlp.gate.weight"], start["model.layers.0.mlp.gate.weight"])
    for k in got:
        torch.testing.assert_close(got[k], start[k] - 0.5 * (ref[k] - start[k]), rtol=1e-5, atol=1e-5, msg=k)


def test_a_dense_method_merges_each_expert(moe, tmp_path):
    """``dare_linear`` at density 1 (no drop) is the weighted sum of each expert's dense ΔW_e, refactored to a
    rank that holds it exactly: the dense path splits and rejoins the experts like the exact one."""
    _, base, a, b = moe
    composed = compose_adapters([read_adapter(a), read_adapter(b)], [0.4, 0.9], method="dare_linear",
                                params={"density": 1.0, "seed": 0})
    assert max(composed.truncation_errors.values()) < 1e-6
    got = merged_state(base, write_adapter(composed, tmp_path / "dense"))
    start = {k: v.double() for k, v in MixtralForCausalLM.from_pretrained(base).state_dict().items()}
    ma, mb = merged_state(base, a), merged_state(base, b)
    for k in got:
        ref = start[k] + 0.4 * (ma[k] - start[k]) + 0.9 * (mb[k] - start[k])
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-5, msg=k)
