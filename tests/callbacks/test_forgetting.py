"""ForgettingCallback: at each evaluation the reporters get the retained loss and KL to base of the model
being trained (equal to the scores of that model against a separately loaded base), in TRL's SFTTrainer and
DPOTrainer with PEFT, a plain Trainer on a full model with a reference, and the budget warns or stops."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from robustft import ForgettingCallback  # noqa: E402
from robustft.analysis import retention  # noqa: E402
from tests.callbacks.trl_helpers import preference_data, save_tiny_llama  # noqa: E402

RETAINED = [{"prompt": "the cat", "completion": " sat on the mat"}, {"prompt": "a dog", "completion": " ran"},
            {"prompt": "the rug", "completion": " is red and blue"}, {"prompt": "a mat", "completion": " is"}]
TRAIN = [{"prompt": "the dog", "completion": " ran fast"}, {"prompt": "a red cat", "completion": " sat"}] * 4


class Reporter(TrainerCallback):
    """What a reporting integration (TensorBoard, W&B) receives: every ``on_log``'s dict, with the step."""

    def __init__(self):
        self.logs: list[tuple[int, dict]] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def retained(self, key: str) -> dict[int, float]:
        return {step: logs[key] for step, logs in self.logs if key in logs}


def lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")


def sft_trainer(path, out, callbacks, steps=4, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0,
                use_cpu=True, bf16=False, disable_tqdm=True, eval_strategy="steps", eval_steps=2)
    args.update(overrides)
    torch.manual_seed(0)
    return trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), args=trl.SFTConfig(**args),
        train_dataset=Dataset.from_list(TRAIN), eval_dataset=Dataset.from_list(TRAIN[:2]),
        processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora(), callbacks=callbacks,
    )


def scores_of(path, peft_model, state):
    """The scores of ``state`` (the PEFT model's weights at an evaluation), KL to a separately loaded base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_model.load_state_dict(state)
    base = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return retention.score_retention(peft_model, tok, RETAINED, reference=base)


def test_sft_peft_reporters_get_the_retained_loss_and_kl_of_each_evaluation(tmp_path):
    path = save_tiny_llama(tmp_path / "base")
    reporter = Reporter()
    trainer = sft_trainer(path, tmp_path / "run", [reporter, ForgettingCallback(RETAINED, batch_size=3)])
    trainer.train()
    loss, kl = reporter.retained("eval_retained_loss"), reporter.retained("eval_retained_kl")
    assert sorted(loss) == sorted(kl) == [2, 4]
    for step in (2, 4):
        want = scores_of(path, trainer.model, reporter.snapshots[step])
        assert loss[step] == pytest.approx(want.loss, rel=1e-5)
        assert kl[step] == pytest.approx(want.kl, rel=1e-4)
    assert kl[4] > 0
    metrics = trainer.evaluate()  # also in what evaluate() returns (metric_for_best_model can use it)
    assert metrics["eval_retained_loss"] == pytest.approx(loss[4], rel=1e-6)


def test_dpo_peft_logs_the_kl_to_base(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(tmp_path / "base")
    reporter = Reporter()
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                         use_cpu=True, bf16=False, beta=0.5, disable_tqdm=True, eval_strategy="steps",
                         eval_steps=2, per_device_eval_batch_size=4)
    torch.manual_seed(0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                             train_dataset=preference_data(), eval_dataset=preference_data(),
                             processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora(),
                             callbacks=[reporter, ForgettingCallback(RETAINED, metrics="kl")])
    trainer.train()
    kl = reporter.retained("eval_retained_kl")
    assert list(kl) == [2] and "eval_retained_loss" not in reporter.logs[-1][1]
    assert kl[2] == pytest.approx(scores_of(path, trainer.model, reporter.snapshots[2]).kl, rel=1e-4)
    assert kl[2] > 0


def test_full_model_with_a_reference_and_the_start_loss_for_the_budget(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from tests.tiny import lm_dataset, training_args

    path = save_tiny_llama(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    start = retention.score_retention(model, tok, RETAINED, kl=False).loss
    cb = ForgettingCallback(RETAINED, tokenizer=tok, reference=reference, max_loss_increase=100.0,
                            max_kl=1e-6, on_budget="warn")
    reporter = Reporter()
    data = lm_dataset(16, seq_len=6, seed=0).map(lambda r: {"input_ids": [i % 18 for i in r["input_ids"]],
                                                         "labels": [i % 18 for i in r["labels"]]})
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=2, eval_strategy="steps",
                                                      eval_steps=2, learning_rate=5e-2),
                      train_dataset=data, eval_dataset=data, callbacks=[reporter, cb])
    with pytest.warns(RuntimeWarning, match="retained KL .* > max_kl"):
        trainer.train()
    assert cb.start_loss == pytest.approx(start, rel=1e-6)
    want = retention.score_retention(model, tok, RETAINED, reference=reference)
    assert reporter.retained("eval_retained_loss")[2] == pytest.approx(want.loss, rel=1e-5)
    assert reporter.retained("eval_retained_kl")[2] == pytest.approx(want.kl, rel=1e-4)
    assert reporter.retained("eval_retained_over_budget") == {2: 1.0} and trainer.state.global_step == 2


def test_stop_ends_training_at_the_evaluation_over_budget(tmp_path):
    path = save_tiny_llama(tmp_path / "base")
    cb = ForgettingCallback(RETAINED, max_kl=0.0, on_budget="stop")
    trainer = sft_trainer(path, tmp_path / "run", [cb], steps=6)
    with pytest.warns(RuntimeWarning, match="retained KL"):
        trainer.train()
    assert trainer.state.global_step == 2  # stopped after the first evaluation, not at max_steps=6


def test_kl_of_a_full_model_needs_a_reference_before_any_step(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    from tests.tiny import lm_dataset, training_args

    path = save_tiny_llama(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=2),
                      train_dataset=lm_dataset(8, seq_len=6), callbacks=[ForgettingCallback(RETAINED)])
    with pytest.raises(ValueError, match="reference"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, option", [
    (dict(metrics="ppl"), "metrics"), (dict(on_budget="halt"), "on_budget"),
    (dict(max_kl=0.1, metrics="loss"), "max_kl"), (dict(max_loss_increase=-1), "max_loss_increase"),
])
def test_options_are_checked_when_built(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ForgettingCallback(RETAINED, **kwargs)
