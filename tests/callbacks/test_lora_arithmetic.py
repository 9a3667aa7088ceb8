"""LoRAArithmeticCallback in a real Trainer on a tiny local Llama: composite ΔW, evaluation, early errors."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback
from tests.lora.conftest import make_adapter, peft_deltas, save_base


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    base = save_base(root / "base")
    other = make_adapter(base, root / "other", 5, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    return base, other, data


def make_trainer(base, data, out, callbacks):
    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    args = TrainingArguments(
        out,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=callbacks)


def test_composite_equals_recipe_and_is_evaluated(setup, tmp_path):
    base, other, data = setup
    cb = LoRAArithmeticCallback({"self": 1.0, str(other): -0.5}, evaluate=True)
    trainer = make_trainer(base, data, tmp_path / "run", [cb])
    cb.attach(trainer)
    trainer.train()
    trained = tmp_path / "trained"
    trainer.model.save_pretrained(trained)
    composite = tmp_path / "run" / "composed"
    refs = peft_deltas(base, {"t": trained, "o": other, "c": composite})
    assert set(refs["c"]) == set(refs["t"]) | set(refs["o"])
    assert any(dw.abs().max() > 0 for dw in refs["t"].values())  # B really trained away from zero
    for module, got in refs["c"].items():
        want = refs["t"].get(module, 0) - 0.5 * refs["o"].get(module, 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the evaluation is of the composite: same loss as a fresh model loaded with it
    fresh = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), composite)
    ref = Trainer(model=fresh, args=trainer.args, eval_dataset=data).evaluate()
    assert cb.metrics["composed_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert any("composed_loss" in row for row in trainer.state.log_history)
    # and the trained adapter is active again, the composite unloaded
    assert trainer.model.active_adapter == "default" and list(trainer.model.peft_config) == ["default"]


def test_bad_setups_fail_before_training(setup, tmp_path):
    base, other, data = setup
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoRAArithmeticCallback({str(tmp_path / "typo"): 1.0})
    with pytest.raises(ValueError, match="method"):
        LoRAArithmeticCallback({str(other): 1.0}, method="average")
    (tmp_path / "run" / "composed").mkdir(parents=True)
    trainer = make_trainer(base, data, tmp_path / "run", [LoRAArithmeticCallback({str(other): 1.0})])
    with pytest.raises(FileExistsError, match="composed"):
        trainer.train()
    assert trainer.state.global_step == 0
    # an adapter for another model size is refused at train begin, naming the module
    wide = make_adapter(
        save_base(tmp_path / "wide", hidden=48), tmp_path / "w", 1, r=2, target_modules=["q_proj"]
    )
    trainer = make_trainer(base, data, tmp_path / "run3", [LoRAArithmeticCallback({str(wide): 1.0})])
    with pytest.raises(ValueError, match=r"different base models|q_proj"):
        trainer.train()
    assert not (tmp_path / "run3" / "composed").exists()
