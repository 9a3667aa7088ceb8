"""EMAReferenceCallback: TRL's DPO/GRPO reference is the EMA of the policy (WARP's EMA anchor).

Full models: the run equals TRL's own ``sync_ref_model`` with α = 1 − β, step 1 (reference and policy).
PEFT: the reference log-probs TRL computes equal those of a separately built base + adapter model whose
adapter is the EMA of the recorded adapter states, by a plain loop; TRL's sync refuses PEFT.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from robustft import EMAReferenceCallback  # noqa: E402
from tests.callbacks.trl_helpers import PAIRS, completion_logps, preference_data  # noqa: E402

DECAY = 0.6
STEPS = 4


def dpo_trainer(path, tmp_path, callbacks=(), peft_config=None, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0,
        use_cpu=True, bf16=False, beta=0.5, disable_tqdm=True,  # bf16 autocast: inexact reference
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), args=trl.DPOConfig(**kwargs),
        train_dataset=preference_data(), processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=list(callbacks), peft_config=peft_config,
    )


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")


def test_full_model_equals_trl_sync_ref_model(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    """ref ← β·ref + (1−β)·policy each step is TRL's sync_ref_model with α = 1 − β, step 1: same reference
    weights, and (since the loss reads the reference) the same policy."""
    theirs = dpo_trainer(tiny_path, tmp_path / "trl", sync_ref_model=True, ref_model_mixup_alpha=1 - DECAY,
                         ref_model_sync_steps=1)
    theirs.train()
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_path).named_parameters())
    ours = dpo_trainer(tiny_path, tmp_path / "ours", callbacks=[EMAReferenceCallback(DECAY)])
    ours.train()
    ref_ours, ref_theirs = dict(ours.ref_model.named_parameters()), dict(theirs.ref_model.named_parameters())
    logged = [h for h in ours.state.log_history if "ema_ref/distance" in h]
    assert len(logged) == STEPS and all(h["ema_ref/decay"] == DECAY for h in logged)
    moved = max((ref_ours[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3  # the reference really followed the policy
    for name, p in ref_theirs.items():
        torch.testing.assert_close(ref_ours[name], p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


class AdapterRecorder(TrainerCallback):
    """The trained adapter's tensors at the start and after every optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def _record(self, model):
        self.states.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model)


def test_peft_reference_is_base_plus_ema_adapter(tiny_path, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    recorder = AdapterRecorder()
    trainer = dpo_trainer(tiny_path, tmp_path, callbacks=[recorder, EMAReferenceCallback(DECAY)],
                          peft_config=lora_config())
    trainer.train()
    assert len(recorder.states) == STEPS + 1

    ema = {n: t.clone() for n, t in recorder.states[0].items()}  # the EMA, by a plain loop
    for state in recorder.states[1:]:
        for n in ema:
            ema[n] = DECAY * ema[n] + (1 - DECAY) * state[n]

    # an independent model: the base from disk plus a fresh adapter holding the EMA
    independent = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), lora_config()).eval()
    params = dict(independent.named_parameters())
    with torch.no_grad():
        for n, t in ema.items():
            params[n].copy_(t)
    live = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), lora_config()).eval()
    with torch.no_grad():
        for n, p in live.named_parameters():
            if n in recorder.states[-1]:
                p.copy_(recorder.states[-1][n])

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    got = torch.cat([chosen, rejected])
    with torch.no_grad():
        expected = completion_logps(independent, batch)
        policy = completion_logps(live, batch)
        base = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_path).eval(), batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3 and (got - policy).abs().max() > 1e-3  # neither base nor policy
    # the reference adapter holds exactly the EMA, and is frozen; the base weights are not copied
    ref_params = {n: p for n, p in trainer.model.named_parameters() if ".ref." in n}
    assert ref_params and not any(p.requires_grad for p in ref_params.values())
    for n, t in ema.items():
        torch.testing.assert_close(ref_params[n.replace(".default.", ".ref.")], t, rtol=1e-6, atol=1e-7)
    # no copy of the base model: the policy holds the base once, the adapter twice, and TRL no ref_model
    n_base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_path).parameters())
    n_adapter = sum(t.numel() for t in ema.values())
    assert trainer.ref_model is None
    assert sum(p.numel() for p in trainer.model.parameters()) == n_base + 2 * n_adapter


def test_trl_refuses_sync_ref_model_with_peft(tiny_path, tmp_path):
    """The case this callback exists for: TRL's own reference sync is not available for PEFT policies."""
    with pytest.raises(NotImplementedError, match="sync_ref_model=True.*PEFT model.*not supported"):
        dpo_trainer(tiny_path, tmp_path, peft_config=lora_config(), sync_ref_model=True)


@pytest.mark.parametrize("option, value, match", [
    ("sync_ref_model", True, "sync_ref_model=True would move the reference a second time"),
    ("precompute_ref_log_probs", True, "precompute_ref_log_probs=True"),
    ("beta", 0.0, "beta=0.0, so the trainer computes no reference"),
])
def test_refuses_settings_where_the_reference_cannot_follow(tiny_path, tmp_path, option, value, match):
    trainer = dpo_trainer(tiny_path, tmp_path, callbacks=[EMAReferenceCallback(DECAY)], **{option: value})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # no step was taken


@pytest.mark.parametrize("option", ["device", "dtype"])
def test_storage_options_are_refused(option):
    with pytest.raises(ValueError, match=f"{option} is not an option"):
        EMAReferenceCallback(0.9, **{option: "cpu" if option == "device" else "float32"})


def test_plain_trainer_without_reference_is_refused(tmp_path):
    from transformers import Trainer

    from tests.tiny import tiny_bert, token_dataset, training_args

    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=1),
                      train_dataset=token_dataset(8), callbacks=[EMAReferenceCallback(0.9)])
    with pytest.raises(RuntimeError, match="'ref_model'"):
        trainer.train()


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "peft"])
def test_resume_equals_uninterrupted(tiny_path, tmp_path, use_peft):
    """A resumed run's reference is the uninterrupted one's: full models through the callback's state (TRL
    rebuilds its reference from the model path), PEFT also through the "ref" adapter the Trainer saves and
    loads with the checkpoint (kept as it is by the callback)."""
    config = lora_config() if use_peft else None
    whole = dpo_trainer(tiny_path, tmp_path, callbacks=[EMAReferenceCallback(DECAY)], peft_config=config,
                        save_strategy="steps", save_steps=2)
    whole.train()
    resumed = dpo_trainer(tiny_path, tmp_path / "again", callbacks=[EMAReferenceCallback(DECAY)],
                          peft_config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    owner = (lambda t: t.model) if use_peft else (lambda t: t.ref_model)
    ref = {n: p for n, p in owner(resumed).named_parameters() if not use_peft or ".ref." in n}
    assert ref
    for name, p in owner(whole).named_parameters():
        if name in ref:
            torch.testing.assert_close(ref[name], p, rtol=1e-6, atol=1e-7, msg=name)


def grpo_trainer(path, tmp_path, callbacks=(), peft_config=None, **overrides):
    """GRPO on the prompts, rewarded by completion length; SGD, so that float rounding is not amplified
    by Adam's normalisation of near-zero gradients when two runs are compared."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=4,
        max_steps=3, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", beta=0.5, report_to=[],
        save_strategy="no", seed=0, use_cpu=True, bf16=False, logging_steps=1, disable_tqdm=True,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward, args=trl.GRPOConfig(**kwargs),
        train_dataset=Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS]}),
        processing_class=AutoTokenizer.from_pretrained(path), callbacks=list(callbacks),
        peft_config=peft_config,
    )


@pytest.mark.slow
def test_grpo_full_model_equals_trl_sync_ref_model(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM

    theirs = grpo_trainer(tiny_path, tmp_path / "trl", sync_ref_model=True, ref_model_mixup_alpha=1 - DECAY,
                          ref_model_sync_steps=1)
    theirs.train()
    ours = grpo_trainer(tiny_path, tmp_path / "ours", callbacks=[EMAReferenceCallback(DECAY)])
    ours.train()
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_path).named_parameters())
    assert max((p - start[n]).abs().max().item() for n, p in ours.ref_model.named_parameters()) > 1e-2
    for (name, p), q in zip(ours.ref_model.named_parameters(), theirs.ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_grpo_peft_reference_adapter_holds_the_ema(tiny_path, tmp_path):
    """GRPO reads the PEFT reference through the same "ref" adapter (tests/core/test_compat.py); it holds
    the EMA
    of the recorded adapter states and the KL to it is logged."""
    recorder = AdapterRecorder()
    trainer = grpo_trainer(tiny_path, tmp_path, callbacks=[recorder, EMAReferenceCallback(DECAY)],
                           peft_config=lora_config())
    trainer.train()
    ema = {n: t.clone() for n, t in recorder.states[0].items()}
    for state in recorder.states[1:]:
        for n in ema:
            ema[n] = DECAY * ema[n] + (1 - DECAY) * state[n]
    params = dict(trainer.model.named_parameters())
    moved = max((ema[n] - recorder.states[0][n]).abs().max().item() for n in ema)
    assert moved > 1e-3
    for n, t in ema.items():
        torch.testing.assert_close(params[n.replace(".default.", ".ref.")], t, rtol=1e-6, atol=1e-7)
    assert any(h.get("kl", 0.0) > 0 for h in trainer.state.log_history)


def test_bf16_reference_keeps_a_bf16_ema_as_trls_sync():
    """docs/alignment.md: a bf16 reference keeps a bf16 EMA, "as TRL's sync". The update the callback applies
    to the reference's own tensors (``ops.averaging.ema_update_``) and TRL's ``SyncRefModelCallback``
    update both stay in bfloat16 and agree to two bf16 ulps after three updates (a lerp and TRL's mul/add
    round differently)."""
    from trl.trainer.callbacks import SyncRefModelCallback

    from robustft.ops.averaging import ema_update_

    g = torch.Generator().manual_seed(0)
    policy = torch.nn.Linear(32, 16).to(torch.bfloat16)
    theirs = torch.nn.Linear(32, 16).to(torch.bfloat16)
    with torch.no_grad():
        for p in (*policy.parameters(), *theirs.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    ours = [p.detach().clone() for p in theirs.parameters()]
    beta = 0.9
    for _ in range(3):
        SyncRefModelCallback._sync_target_model(policy, theirs, 1 - beta)
        ema_update_(ours, [p.detach() for p in policy.parameters()], beta)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    for mine, trl_ref in zip(ours, theirs.parameters(), strict=True):
        assert mine.dtype == trl_ref.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), trl_ref.detach().float(), rtol=2 ** -6, atol=2 ** -7)
