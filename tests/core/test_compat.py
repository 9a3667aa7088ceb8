"""robustft.core.compat: every private name it relies on still exists in the INSTALLED library versions.

One test per private access. When a release moves one, the test fails naming the attribute; update
``robustft/core/compat.py`` (and its ``CHECKED_AGAINST``) with the new name. The DeepSpeed checks inspect
the classes without launching anything.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

from robustft.core import compat
from tests.callbacks.sam_helpers import MLP, NoisyLinearData, make_trainer


def _run_one_step(tmp_path, callback: TrainerCallback, **kw) -> Trainer:
    torch.manual_seed(0)
    data = NoisyLinearData(n=8)
    trainer = make_trainer(MLP(), tmp_path, [callback], total_batch=8, steps=1, lr=0.0, data=data, **kw)
    trainer.train()
    return trainer


def test_module_imports_only_stdlib_and_torch():
    """compat.py alone (loaded without the robustft package) imports no transformers/accelerate/DeepSpeed."""
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('compat', {compat.__file__!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "heavy = ('transformers', 'accelerate', 'deepspeed', 'trl', 'peft'); "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_caller_self_finds_the_trainer_and_handler_in_a_real_event(tmp_path):
    """``caller_self`` reads the frame local ``self`` of the frames running a callback event: the
    CallbackHandler's ``call_event`` right above the callback, the Trainer further up."""

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.trainer = compat.caller_self(Trainer)
            self.handler = compat.caller_self(CallbackHandler, depth=2)

    probe = Probe()
    trainer = _run_one_step(tmp_path, probe)
    assert probe.trainer is trainer, "frame local 'self' of Trainer.train not found on the call stack"
    assert probe.handler is trainer.callback_handler, (
        "frame local 'self' of CallbackHandler.call_event is no longer the callback's caller"
    )


def test_trainer_resume_checkpoint_reads_the_training_loops_local(tmp_path):
    """``_inner_training_loop``'s local ``resume_from_checkpoint`` holds the folder ``train`` resumes from
    (None when it starts afresh); outside a training loop the answer is ``UNKNOWN_RESUME``."""
    assert "resume_from_checkpoint" in inspect.signature(Trainer._inner_training_loop).parameters, (
        "Trainer._inner_training_loop has no parameter 'resume_from_checkpoint'"
    )

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.folder = compat.trainer_resume_checkpoint(Trainer)

    probe = Probe()
    trainer = _run_one_step(tmp_path, probe, save_strategy="steps", save_steps=1)
    assert probe.folder is None
    checkpoint = tmp_path / "checkpoint-1"
    assert checkpoint.is_dir()
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert probe.folder == str(checkpoint), "frame local 'resume_from_checkpoint' not found"
    assert compat.trainer_resume_checkpoint(Trainer) is compat.UNKNOWN_RESUME


def test_trainer_clip_grad_norm(tmp_path):
    """``Trainer._clip_grad_norm(model)`` clips to ``max_grad_norm`` (SAM's replay clips with it)."""

    class Clip(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for p in model.parameters():
                p.grad.mul_(1000.0)
            compat.clip_grad_norm(self.trainer, model)
            self.norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()

    clip = Clip()
    torch.manual_seed(0)
    data = NoisyLinearData(n=8)
    trainer = make_trainer(
        MLP(), tmp_path, [clip], total_batch=8, steps=1, lr=0.0, data=data, max_grad_norm=0.5
    )
    assert hasattr(trainer, "_clip_grad_norm"), "transformers.Trainer has no '_clip_grad_norm'"
    clip.trainer = trainer
    trainer.train()
    assert clip.norm == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("kind, divisor", [("mlp", 2), ("bert", 1)])
def test_trainer_loss_accumulation_predicts_training_steps_division(tmp_path, kind, divisor):
    """``trainer_loss_accumulation`` says what ``training_step`` divides ``compute_loss``'s loss by (GA for a
    model without loss kwargs, nothing for BERT given ``num_items_in_batch``) and the step's micro-batches."""
    from tests.callbacks.sam_helpers import tiny_bert

    seen = []

    def make_wrappers(trainer):
        compute, backward = trainer.compute_loss, trainer.accelerator.backward

        def compute_loss(model, inputs, *args, **kwargs):
            loss = compute(model, inputs, *args, **kwargs)
            num_items = kwargs.get("num_items_in_batch")
            seen.append([loss.item(), compat.trainer_loss_accumulation(trainer, num_items)])
            return loss

        def backward_(loss, **kwargs):
            seen[-1].append(loss.item())
            return backward(loss, **kwargs)

        trainer.compute_loss, trainer.accelerator.backward = compute_loss, backward_

    torch.manual_seed(0)
    model, data = (MLP(), NoisyLinearData(n=16)) if kind == "mlp" else (tiny_bert(0), None)
    trainer = make_trainer(model, tmp_path, [], ga=2, steps=1, lr=0.0, data=data)
    make_wrappers(trainer)
    trainer.train()
    assert len(seen) == 2
    for loss, (div, steps), backed in seen:
        assert (div, steps) == (divisor, 2)
        assert backed == pytest.approx(loss / div, rel=1e-6)


def test_trainer_loss_accumulation_names_a_missing_attribute():
    with pytest.raises(RuntimeError, match="'loss_is_scaled_for_ga'.*transformers 5.24.0"):
        compat.trainer_loss_accumulation(object(), None)


def test_clip_grad_norm_names_a_missing_attribute():
    with pytest.raises(RuntimeError, match="'_clip_grad_norm'.*transformers 5.24.0"):
        compat.clip_grad_norm(object(), torch.nn.Linear(1, 1))


def test_trl_sft_trainer_keeps_metrics_and_token_count():
    """TRL's SFTTrainer sets ``_metrics`` and ``_total_train_tokens`` in ``__init__`` and updates them in
    ``compute_loss``; ``trl_bookkeeping_kept`` puts both back after SAM's replay."""
    trl = pytest.importorskip("trl")
    sft = trl.SFTTrainer
    for name in ("_metrics", "_total_train_tokens"):
        assert f"self.{name} =" in inspect.getsource(sft.__init__), (
            f"trl.SFTTrainer.__init__ no longer sets {name!r}"
        )
        assert f"self.{name}" in inspect.getsource(sft.compute_loss), (
            f"trl.SFTTrainer.compute_loss no longer updates {name!r}"
        )

    class Fake:
        _metrics = {"train": {"num_tokens": [10]}}
        _total_train_tokens = 10

    fake = Fake()
    with compat.trl_bookkeeping_kept(fake):
        fake._metrics["train"]["num_tokens"].append(20)
        fake._total_train_tokens = 20
    assert fake._metrics == {"train": {"num_tokens": [10]}} and fake._total_train_tokens == 10


@pytest.mark.parametrize("name, method", [
    ("DPOTrainer", "_compute_loss"), ("DPOTrainer", "compute_ref_log_probs"),
    ("GRPOTrainer", "_generate_and_score_completions"), ("RLOOTrainer", "_generate_and_score_completions"),
])
def test_trl_reference_forward_uses_the_ref_adapter_or_ref_model(name, method):
    """EMAReferenceCallback holds the EMA where TRL reads the reference: ``trainer.ref_model`` (set in
    ``__init__``), or for a PEFT policy the adapter ``compat.TRL_REF_ADAPTER``, which the reference forward
    activates with ``use_adapter`` when it exists."""
    trl = pytest.importorskip("trl")
    trainer = getattr(trl, name)
    assert "self.ref_model =" in inspect.getsource(trainer.__init__), f"trl.{name} no longer sets ref_model"
    source = " ".join(inspect.getsource(getattr(trainer, method)).split())
    ref = compat.TRL_REF_ADAPTER
    assert "use_adapter(" in source and f'adapter_name="{ref}" if "{ref}" in' in source, (
        f"trl.{name}.{method}: the reference forward no longer activates adapter {ref!r}"
    )


def test_trl_reference_model_names_a_missing_attribute():
    with pytest.raises(RuntimeError, match="'ref_model'.*trl 1.16.0"):
        compat.trl_reference_model(object())


def test_grad_scaler_per_optimizer_state():
    """``GradScaler._per_optimizer_states`` (a defaultdict of ``_refresh_per_optimizer_state``) records
    that a step's gradients were unscaled; clearing it lets ``unscale_`` run again, restoring it puts
    the "already unscaled" state back."""
    assert hasattr(torch.amp.grad_scaler, "_refresh_per_optimizer_state"), (
        "torch.amp.grad_scaler has no '_refresh_per_optimizer_state'"
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    assert hasattr(scaler, "_per_optimizer_states"), "torch.amp.GradScaler has no '_per_optimizer_states'"
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale(p.sum()).backward()  # gradient 4 = init_scale
    scaler.unscale_(opt)
    assert torch.equal(p.grad, torch.ones(3))
    saved = compat.grad_scaler_state(scaler)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(opt)
    compat.reset_grad_scaler(scaler)
    p.grad = torch.full((3,), 8.0)
    scaler.unscale_(opt)  # unscaled afresh
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    compat.restore_grad_scaler(scaler, saved)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(opt)


@pytest.fixture(scope="module")
def zero():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3


def test_deepspeed_zero12_lazy_optimizer_state_link(zero):
    """ZeRO-1/2: ``_lazy_init_hp_params_optimizer_state`` guarded by ``_hp_optimizer_states_linked``."""
    zero12 = zero[0]
    assert hasattr(zero12, "_lazy_init_hp_params_optimizer_state"), (
        "DeepSpeedZeroOptimizer has no '_lazy_init_hp_params_optimizer_state'"
    )
    body = inspect.getsource(zero12._lazy_init_hp_params_optimizer_state)
    assert "self._hp_optimizer_states_linked" in body, (
        "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state no longer reads "
        "'_hp_optimizer_states_linked'"
    )
    assert "self._hp_optimizer_states_linked = False" in inspect.getsource(zero12.__init__)

    class Fake:  # what relink does, on an object that records the calls
        _hp_optimizer_states_linked = True
        calls = []

        def _lazy_init_hp_params_optimizer_state(self):
            self.calls.append(self._hp_optimizer_states_linked)

    fake = Fake()
    compat.relink_zero_optimizer_states(fake)
    assert fake.calls == [False]


def test_deepspeed_zero3_partition_cache(zero):
    """ZeRO-3: the optimizer sets ``param._z3_optimizer = self`` and has ``empty_partition_cache``."""
    zero3 = zero[1]
    assert callable(getattr(zero3, "empty_partition_cache", None)), (
        "DeepSpeedZeroOptimizer_Stage3 has no 'empty_partition_cache'"
    )
    assert "._z3_optimizer = self" in inspect.getsource(zero3), (
        "DeepSpeedZeroOptimizer_Stage3 no longer sets '_z3_optimizer' on its parameters"
    )

    class Opt:
        emptied = 0

        def empty_partition_cache(self):
            self.emptied += 1

    p = torch.nn.Parameter(torch.ones(1))
    p._z3_optimizer = Opt()
    compat.release_zero3_gathered(p)
    compat.release_zero3_gathered(torch.ones(1))  # a plain tensor: nothing to do
    assert p._z3_optimizer.emptied == 1


def test_training_loop_running_and_clip_grad_norm_name(tmp_path):
    """``training_loop_running`` is True inside the Trainer's ``_inner_training_loop`` only (the frame's
    ``self``); ``clip_grad_norm_name`` names the method the Trainer clips with."""
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((compat.training_loop_running(trainer), compat.training_loop_running(other)))

    torch.manual_seed(0)
    trainer = make_trainer(MLP(), tmp_path / "a", [Probe()], total_batch=8, steps=1, lr=0.0,
                           data=NoisyLinearData(n=8))
    other = make_trainer(MLP(), tmp_path / "b", [], total_batch=8, steps=1, lr=0.0, data=NoisyLinearData(n=8))
    trainer.train()
    assert seen == [(True, False)]
    assert not compat.training_loop_running(trainer)
    name = compat.clip_grad_norm_name(trainer)
    assert name == "_clip_grad_norm" and callable(getattr(trainer, name))



def _linear_warmup(step: int, base: float, warmup: int, total: int) -> float:
    """transformers' "linear" schedule written out: warmup to ``base`` over ``warmup`` steps, then to 0."""
    if step < warmup:
        return base * step / warmup
    return base * max(0.0, (total - step) / (total - warmup))


def _schedule_trainer(tmp_path, callbacks, steps: int, optimizers=(None, None), **args) -> Trainer:
    from transformers import TrainingArguments

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                             optim="sgd", **args)
    return Trainer(model=MLP(), args=args, train_dataset=NoisyLinearData(n=8), callbacks=callbacks,
                   optimizers=optimizers)


def test_restart_lr_schedule_rebuilds_and_continues_the_trainers_schedule(tmp_path):
    """``restart_lr_schedule`` (LP-FT's two-stage form): from the step it is called on, the optimizer gets
    the rates of a fresh schedule of the TrainingArguments' kind and warmup over the given steps; with
    ``state`` the schedule continues from that state; the callbacks are handed the new scheduler."""
    base, warmup = 0.1, 2
    lrs, handed = [], []

    class Restart(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            lrs.append(optimizer.param_groups[0]["lr"])
            handed.append(lr_scheduler is trainer.lr_scheduler)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:  # stage two: a fresh schedule over the 4 steps left
                self.first = compat.restart_lr_schedule(trainer, 4)
            elif state.global_step == 5:  # rebuilt again, continuing from the state the first had reached
                self.first.step()  # (the state it would reach at step 5: one step past the Trainer's)
                again = compat.restart_lr_schedule(trainer, 4, state=self.first.state_dict())
                assert again is not self.first

    trainer = _schedule_trainer(tmp_path, [Restart()], 7, learning_rate=base, lr_scheduler_type="linear",
                                warmup_steps=warmup)
    trainer.train()
    want = [_linear_warmup(s, base, warmup, 7) for s in range(3)]  # the Trainer's own schedule
    want += [_linear_warmup(s, base, warmup, 4) for s in (0, 1, 3, 4)]  # the fresh one; its state at 5 -> 3
    assert lrs == pytest.approx(want, abs=1e-12) and all(handed)


def test_restart_lr_schedule_refuses_a_scheduler_the_user_passed(tmp_path):
    """A scheduler given to the Trainer cannot be rebuilt from the TrainingArguments: a named refusal."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = _schedule_trainer(tmp_path, [], 1, optimizers=(opt, sched))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    with pytest.raises(ValueError, match="two_stage: the Trainer was given its own lr scheduler"):
        compat.restart_lr_schedule(trainer, 4)
    assert trainer.lr_scheduler is sched


def test_set_scheduler_last_lr_is_what_get_last_lr_returns():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    compat.set_scheduler_last_lr(sched, [0.025])
    assert sched.get_last_lr() == [0.025]
    with pytest.raises(RuntimeError, match="_last_lr"):
        compat.set_scheduler_last_lr(object(), [0.1])
