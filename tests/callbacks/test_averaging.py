"""Averaging callbacks inside a real Trainer, checked against swa_utils and brute force."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import Trainer, TrainerCallback

from robustft import EMACallback, LAWACallback, MomentumInterpolationCallback, SWACallback
from robustft.core.params import select_parameters
from tests.tiny import fed_average, stop_at, tiny_bert, token_dataset, training_args


class Recorder(TrainerCallback):
    """Records the live selected weights after every optimizer step (before any swap)."""

    def __init__(self, **select):
        self.select = select
        self.points: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = select_parameters(model, **self.select)
        self.points.append({n: p.detach().clone() for n, p in params.items()})


def _train(callbacks, tmp_path, model=None, **args):
    model = model or tiny_bert()
    trainer = Trainer(
        model=model, args=training_args(tmp_path, **args), train_dataset=token_dataset(),
        eval_dataset=token_dataset(32, seed=1), callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_ema_matches_averaged_model(tmp_path):
    ema, rec = EMACallback(decay=0.8, save_dir=None), Recorder()
    trainer = _train([ema, rec], tmp_path)
    averaged = AveragedModel(tiny_bert(), multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=False)
    ref = fed_average(averaged, rec.points, lambda: tiny_bert(seed=1))
    for name, avg in zip(ema.average().names, ema.average().tensors):
        torch.testing.assert_close(avg, ref[name], atol=1e-6, rtol=0)
    logged = [h for h in trainer.state.log_history if "ema/decay" in h]
    assert logged and logged[-1]["ema/num_updates"] == 8 and logged[-1]["ema/distance"] > 0


def test_swa_matches_averaged_model_from_start_every_n(tmp_path):
    swa, rec = SWACallback(start=2, update_every=3, save_dir=None), Recorder()
    _train([swa, rec], tmp_path)
    used = [rec.points[s - 1] for s in (2, 5, 8)]  # global steps 2, 5, 8
    ref = fed_average(AveragedModel(tiny_bert(), use_buffers=False), used, lambda: tiny_bert(seed=1))
    assert swa.num_updates == 3
    for name, avg in zip(swa.average().names, swa.average().tensors):
        torch.testing.assert_close(avg, ref[name], atol=1e-6, rtol=0)


def test_lawa_is_mean_of_last_k_snapshots(tmp_path):
    lawa, rec = LAWACallback(k=3, update_every=2, save_dir=None), Recorder()
    _train([lawa, rec], tmp_path)
    last = [rec.points[s - 1] for s in (4, 6, 8)]
    avg = lawa.average()
    for name, t in zip(avg.names, avg.tensors):
        torch.testing.assert_close(t, torch.stack([p[name] for p in last]).mean(0), atol=1e-6, rtol=0)


def test_momentum_interpolation_starts_from_pretrained_and_resets_fast_weights(tmp_path):
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    mom, rec = MomentumInterpolationCallback(momentum=0.7, save_dir=None), Recorder()
    _train([mom, rec], tmp_path / "task1", model=model)
    slow = dict(start)
    for point in rec.points:
        slow = {n: 0.7 * slow[n] + 0.3 * point[n] for n in point}
    for name, t in zip(mom.average().names, mom.average().tensors):
        torch.testing.assert_close(t, slow[name], atol=1e-6, rtol=1e-6)
    # task 2: the fast weights start from the slow ones
    first = Recorder()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.begin = {n: p.detach().clone() for n, p in model.named_parameters()}

    probe = Probe()
    _train([mom, probe, first], tmp_path / "task2", model=model, max_steps=2)
    assert mom.task == 1
    for name in slow:
        torch.testing.assert_close(probe.begin[name], slow[name], atol=1e-6, rtol=1e-6)


def test_eval_with_ema_differs_from_live_and_restores_live_weights(tmp_path):
    class LiveAtStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.live = {n: p.detach().clone() for n, p in model.named_parameters()}

    ema, probe = EMACallback(decay=0.6, save_dir=None), LiveAtStep()
    trainer = _train([ema, probe], tmp_path, eval_strategy="steps", eval_steps=8, learning_rate=2e-2)
    ema_loss = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), probe.live[n]), n  # bit-identical live weights after the eval
    live_loss = trainer.evaluate()["eval_loss"]
    with ema.averaged_weights():
        again = trainer.evaluate()["eval_loss"]
    assert ema_loss != pytest.approx(live_loss, abs=1e-6)
    assert ema_loss == pytest.approx(again, abs=1e-6)  # the in-training eval really used the EMA weights


@pytest.mark.parametrize("make", [lambda: EMACallback(decay=0.7, save_dir=None),
                                  lambda: LAWACallback(k=2, update_every=3, save_dir=None),
                                  lambda: SWACallback(start=0.25, save_dir=None)])
def test_resume_equals_uninterrupted(tmp_path, make):
    full = make()
    _train([full], tmp_path / "full")
    interrupted = make()
    _train([interrupted, stop_at(4)], tmp_path / "part", save_strategy="steps", save_steps=4)
    assert (tmp_path / "part" / "checkpoint-4" / "robustft").is_dir()
    resumed = make()
    trainer = Trainer(
        model=tiny_bert(), args=training_args(tmp_path / "part", save_strategy="no"),
        train_dataset=token_dataset(), callbacks=[resumed],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert resumed.num_updates == full.num_updates
    for a, b in zip(full.average().tensors, resumed.average().tensors):
        assert torch.equal(a, b)


def test_resume_without_state_raises(tmp_path):
    _train([stop_at(4)], tmp_path, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=token_dataset(),
                      callbacks=[EMACallback(save_dir=None)])
    with pytest.raises(FileNotFoundError, match="EMACallback: resuming from .*checkpoint-4"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_lora_only_adapter_weights_averaged_and_saved_adapter_loads(tmp_path):
    base = tiny_bert()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    ema = EMACallback(decay=0.5, copy_to_model_at_end=False)
    trainer = _train([ema], tmp_path, model=model, learning_rate=2e-2)
    names = ema.average().names
    assert names and all("lora_" in n or "classifier" in n for n in names)
    adapter = tmp_path / "ema"
    assert (adapter / "adapter_config.json").is_file()
    json.loads((adapter / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(tiny_bert(), str(adapter))
    loaded_params = dict(loaded.named_parameters())
    for name, t in zip(names, ema.average().tensors):
        torch.testing.assert_close(loaded_params[name].detach(), t)
    live = dict(trainer.model.named_parameters())
    assert any(not torch.equal(live[n].detach(), t) for n, t in zip(names, ema.average().tensors))


def test_plain_classifier_saved_ema_model_loads_and_copy_at_end(tmp_path):
    from transformers import AutoModelForSequenceClassification

    ema = EMACallback(decay=0.5, copy_to_model_at_end=True)
    trainer = _train([ema], tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ema"))
    loaded_params = dict(loaded.named_parameters())
    for name, t in zip(ema.average().names, ema.average().tensors):
        torch.testing.assert_close(loaded_params[name].detach(), t)
        assert torch.equal(dict(trainer.model.named_parameters())[name].detach(), t)


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: EMACallback(decay=1.0), "decay"),
        (lambda: EMACallback(decay=0.0), "decay"),
        (lambda: EMACallback(update_every=0), "update_every"),
        (lambda: SWACallback(start=1.5), "start"),
        (lambda: LAWACallback(k=0), "k"),
        (lambda: MomentumInterpolationCallback(momentum=1.2), "momentum"),
    ],
)
def test_bad_configuration(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_pattern_matching_nothing_raises(tmp_path):
    with pytest.raises(ValueError, match="include: pattern 'no_such_layer'"):
        _train([EMACallback(include="no_such_layer")], tmp_path)


def test_bf16_model_gets_float32_shadow(tmp_path):
    model = tiny_bert().to(torch.bfloat16)
    ema, rec = EMACallback(decay=0.9, save_dir=None, device="cpu"), Recorder()
    _train([ema, rec], tmp_path, model=model, learning_rate=5e-2)
    assert all(t.dtype == torch.float32 for t in ema.average().tensors)
    brute = {n: t.float() for n, t in rec.points[0].items()}
    for point in rec.points[1:]:
        brute = {n: 0.9 * brute[n] + 0.1 * point[n].float() for n in point}
    for name, t in zip(ema.average().names, ema.average().tensors):
        torch.testing.assert_close(t, brute[name], atol=1e-6, rtol=1e-5)


def test_metrics_reach_reporting_callbacks_placed_before_user_callbacks(tmp_path):
    class Reporter(TrainerCallback):  # stands for TensorBoard/W&B, which come before user callbacks
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    ema = EMACallback(decay=0.9, save_dir=None)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=3),
                      train_dataset=token_dataset(), callbacks=[ema])
    reporter = Reporter()
    trainer.callback_handler.callbacks.insert(1, reporter)
    trainer.train()
    assert [s["ema/num_updates"] for s in reporter.seen if "ema/num_updates" in s] == [1.0, 2.0, 3.0]


def test_evaluation_that_raises_leaves_the_live_weights(tmp_path):
    class LiveAtStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.live = {n: p.detach().clone() for n, p in model.named_parameters()}

    def broken_metrics(_):
        raise RuntimeError("metric failed")

    probe, ema = LiveAtStep(), EMACallback(decay=0.5, save_dir=None)
    trainer = Trainer(
        model=tiny_bert(), args=training_args(tmp_path, eval_strategy="steps", eval_steps=3, max_steps=3),
        train_dataset=token_dataset(), eval_dataset=token_dataset(16, seed=1), compute_metrics=broken_metrics,
        callbacks=[ema, probe],
    )
    with pytest.raises(RuntimeError, match="metric failed"):
        trainer.train()
    assert ema.distance() > 0  # the average differs from the live weights, so a leak would show
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), probe.live[n]), n


@pytest.mark.parametrize(
    "make",
    [
        lambda save: SWACallback(start=100, copy_to_model_at_end=True, save_dir=save),
        lambda save: EMACallback(start_step=100, copy_to_model_at_end=True, save_dir=save),
        lambda save: LAWACallback(k=2, update_every=100, copy_to_model_at_end=True, save_dir=save),
        lambda save: MomentumInterpolationCallback(start_step=100, copy_to_model_at_end=True, save_dir=save),
    ],
)
def test_run_ending_before_the_first_update_warns_and_leaves_the_model(tmp_path, make):
    avg, rec = make(str(tmp_path / "avg")), Recorder()
    with pytest.warns(RuntimeWarning, match="before the first update"):
        trainer = _train([avg, rec], tmp_path, max_steps=4)
    for n, p in select_parameters(trainer.model).items():  # the trained weights, not θ_start
        assert torch.equal(p.detach(), rec.points[-1][n]), n
    assert not (tmp_path / "avg").exists()
    assert not avg.has_average() and avg.num_updates == 0
    assert not any(f"{avg.prefix}/distance" in h for h in trainer.state.log_history)
    with pytest.raises(RuntimeError, match="no update has happened"):
        avg.average()


def test_evaluation_before_the_first_update_scores_the_live_weights(tmp_path):
    class LiveAt(TrainerCallback):
        def __init__(self):
            self.weights = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    swa, live = SWACallback(start=0.75, save_dir=None), LiveAt()  # first update at step 6 of 8
    trainer = _train([swa, live], tmp_path, eval_strategy="steps", eval_steps=2, learning_rate=2e-2)
    logged = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(logged) == [2, 4, 6, 8]
    for step in (2, 4):  # no average yet: the live weights of that step are evaluated
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                p.copy_(live.weights[step][n])
        assert logged[step] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6), step
    distance_steps = [h["step"] for h in trainer.state.log_history if "swa/distance" in h]
    assert distance_steps and min(distance_steps) == 6


AVERAGES = {
    "ema": lambda: EMACallback(decay=0.8, save_dir=None),
    "swa": lambda: SWACallback(start=2, save_dir=None),
    "lawa": lambda: LAWACallback(k=3, update_every=2, save_dir=None),
    "momentum": lambda: MomentumInterpolationCallback(momentum=0.8, save_dir=None),
}


@pytest.mark.parametrize("make", AVERAGES.values(), ids=AVERAGES.keys())
def test_edits_inside_averaged_weights_never_reach_the_average(tmp_path, make):
    """Inside the block the model and ``average()`` hold the average; an in-place +1 and an optimizer step
    there change neither the stored average nor (after the block) the trained weights; the block runs in the
    caller's grad mode."""
    cb = make()
    trainer = _train([cb], tmp_path)
    model = trainer.model
    params = cb.params
    average = [t.clone() for t in cb.average().tensors]
    trained = {n: p.detach().clone() for n, p in params.items()}
    assert any(not torch.equal(a, trained[n]) for n, a in zip(cb.average().names, average))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {k: torch.tensor(v) for k, v in token_dataset(8)[:8].items()}
    with cb.averaged_weights():
        assert torch.is_grad_enabled()
        for n, a, inside in zip(cb.average().names, average, cb.average().tensors, strict=True):
            assert torch.equal(params[n].detach(), a), n  # the model holds the average
            assert torch.equal(inside, a), n  # and average() still returns it
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        model(**batch).loss.backward()  # a gradient at the swapped-in weights
        optimizer.step()
        assert all(torch.equal(inside, a) for inside, a in zip(cb.average().tensors, average))
    for got, want in zip(cb.average().tensors, average, strict=True):
        assert torch.equal(got, want)
    for n, p in params.items():
        assert torch.equal(p.detach(), trained[n]), n


def test_evaluate_after_a_failed_run_scores_the_live_weights(tmp_path):
    """train() raises: the evaluate wrapper that swaps the EMA in is that run's leftover and acts no more."""
    from tests.callbacks.failing import disarm, fail_training

    ema = EMACallback(decay=0.5, save_dir=None)
    trainer = fail_training(tiny_bert(), tmp_path, [ema], "on_step_end", step=3)
    disarm(trainer)
    trainer.remove_callback(ema)
    data = token_dataset(32, seed=1)
    got = trainer.evaluate(eval_dataset=data)["eval_loss"]
    assert getattr(trainer.evaluate, "robustft_owner", None) is None
    with ema.averaged_weights():
        on_ema = Trainer(model=trainer.model, args=training_args(tmp_path / "e")).evaluate(data)["eval_loss"]
    live = Trainer(model=trainer.model, args=training_args(tmp_path / "l")).evaluate(data)["eval_loss"]
    assert got == live != on_ema


@pytest.mark.parametrize("options", [
    dict(update_freq=2),
    dict(update_freq=3, update_after=2, lag=1, multiplier=2.0, min_ema_multiplier=0.4, ema_power=0.7,
         bias_power=0.5),
])
def test_bema_equals_trl_bema_callback(tmp_path, options):
    from safetensors.torch import load_file
    from trl.trainer.callbacks import BEMACallback as TRLBEMA

    from robustft import BEMACallback

    ours, theirs = BEMACallback(save_dir=str(tmp_path / "ours"), **options), TRLBEMA(**options)
    trainer = _train([ours, theirs], tmp_path, learning_rate=2e-2)
    assert ours.num_updates == len(range(options.get("update_after", 0) + options["update_freq"], 9,
                                         options["update_freq"]))
    ref = dict(theirs.running_model.named_parameters())
    for name, avg in zip(ours.average().names, ours.average().tensors):
        torch.testing.assert_close(avg, ref[name].detach(), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(avg, trainer.model.get_parameter(name).detach())  # not the live weights
    saved_ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    saved_trl = load_file(str(tmp_path / "bema" / "model.safetensors"))  # TRL writes <output_dir>/bema
    for name in ours.average().names:
        torch.testing.assert_close(saved_ours[name], saved_trl[name], atol=1e-6, rtol=1e-6)


def test_bema_refuses_our_names_for_trls_options():
    from robustft import BEMACallback

    with pytest.raises(ValueError, match="update_freq"):
        BEMACallback(update_every=2)
    with pytest.raises(ValueError, match="update_after"):
        BEMACallback(start_step=2)


class TokensAndWeights(Recorder):
    """Also records the Trainer's input-token count after every optimizer step."""

    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.tokens.append(state.num_input_tokens_seen)


@pytest.mark.parametrize("half_life, unit", [("3ba", "steps"), (2.5, "steps"), ("100tok", "tokens")])
def test_ema_half_life_is_the_halving_formula(tmp_path, half_life, unit):
    ema, rec = EMACallback(half_life=half_life, update_every=2, save_dir=None), TokensAndWeights()
    _train([ema, rec], tmp_path, include_num_input_tokens_seen=unit == "tokens",
           per_device_train_batch_size=4 if unit == "tokens" else 8)
    h = 3.0 if half_life == "3ba" else 2.5 if unit == "steps" else 100.0
    steps = (2, 4, 6, 8)
    clock = {s: (rec.tokens[s - 1] if unit == "tokens" else s) for s in steps}
    if unit == "tokens":
        assert clock[4] - clock[2] == 2 * 4 * 8  # two steps of 4 sequences of 8 tokens
    ref = {n: t.double() for n, t in rec.points[1].items()}  # the first update copies
    for prev, s in zip(steps, steps[1:]):
        decay = 0.5 ** ((clock[s] - clock[prev]) / h)
        ref = {n: decay * ref[n] + (1 - decay) * rec.points[s - 1][n].double() for n in ref}
    for name, avg in zip(ema.average().names, ema.average().tensors):
        torch.testing.assert_close(avg.double(), ref[name], atol=1e-6, rtol=0)


def test_ema_half_life_in_tokens_needs_the_token_count(tmp_path):
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        _train([EMACallback(half_life="1000tok", save_dir=None)], tmp_path)
    for bad in ("10ep", "-3ba", "ba", 0):
        with pytest.raises(ValueError, match="half_life"):
            EMACallback(half_life=bad)
    with pytest.raises(ValueError, match="half_life"):
        EMACallback(0.9, half_life="10ba")


class LearningRates(TrainerCallback):
    """The learning rate each optimizer step used."""

    def __init__(self):
        self.used: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.used.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("start, strategy, anneal", [(3, "cos", 3), (0.5, "linear", 2), (2, "cos", 0)])
def test_swalr_equals_torch_swalr_in_a_hand_loop(tmp_path, start, strategy, anneal):
    from torch.optim.swa_utils import SWALR
    from transformers import get_scheduler

    swa = SWACallback(start=start, swa_lr=1e-3, anneal_epochs=anneal, anneal_strategy=strategy, save_dir=None)
    rates = LearningRates()
    trainer = _train([swa, rates], tmp_path, lr_scheduler_type="linear", learning_rate=2e-2)
    first = start if isinstance(start, int) else int(start * 8)
    # torch's recipe: the schedule steps until SWA starts, then SWALR steps instead (once per step here)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-2)
    base, swalr, used = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=8), None, []
    for t in range(1, 9):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        if t >= first:
            swalr = swalr or SWALR(opt, swa_lr=1e-3, anneal_epochs=anneal, anneal_strategy=strategy)
            swalr.step()
        else:
            base.step()
    assert rates.used == pytest.approx(used, abs=1e-12)
    assert used[-1] == pytest.approx(1e-3) and used[first - 1] > 1e-3  # it did take over
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx(used, abs=1e-12)


def test_swalr_bad_options():
    for option in (dict(anneal_strategy="step"), dict(anneal_epochs=-1), dict(swa_lr=-1.0), dict(swa_lr=[])):
        with pytest.raises(ValueError, match=next(iter(option))):
            SWACallback(**option)


@pytest.mark.parametrize("make", [
    lambda: __import__("robustft").BEMACallback(update_freq=2, update_after=1, save_dir=None),
    lambda: EMACallback(half_life="3ba", update_every=3, save_dir=None),
    lambda: SWACallback(start=2, swa_lr=1e-3, anneal_epochs=4, save_dir=None),
])
def test_variants_resume_equals_uninterrupted(tmp_path, make):
    full, rates = make(), LearningRates()
    _train([full, rates], tmp_path / "full", lr_scheduler_type="linear")
    interrupted = make()
    _train([interrupted, stop_at(4)], tmp_path / "part", save_strategy="steps", save_steps=4,
           lr_scheduler_type="linear")
    resumed, resumed_rates = make(), LearningRates()
    trainer = Trainer(
        model=tiny_bert(), train_dataset=token_dataset(), callbacks=[resumed, resumed_rates],
        args=training_args(tmp_path / "part", save_strategy="no", lr_scheduler_type="linear"),
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert resumed.num_updates == full.num_updates
    assert resumed_rates.used == pytest.approx(rates.used[4:], abs=1e-12)
    for a, b in zip(full.average().tensors, resumed.average().tensors):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
