"""End-of-training actions compose by one rule whatever the order of the callback list (docs/composition.md).

Every pair of actions (an average saved, an average copied in, WiSE-FT fixed or swept, LoRA arithmetic) runs
in both list orders through a real Trainer; the final weights (and saved files) are checked against
references computed by hand from the recorded trajectory: torch.optim.swa_utils.AveragedModel for EMA/SWA,
plain loops for LAWA and momentum interpolation, (1−α)·θ_start + α·θ_end for WiSE-FT.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import Trainer, TrainerCallback

from robustft import (
    EMACallback,
    LAWACallback,
    MomentumInterpolationCallback,
    SWACallback,
    WiseFTCallback,
)
from tests.tiny import fed_average, tiny_bert, token_dataset, training_args

STEPS = 6


class Recorder(TrainerCallback):
    """The trainable weights before training and after every optimizer step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = self._take(model)
        self.points: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.points.append(self._take(model))

    @staticmethod
    def _take(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# copy-in averages: (callback, reference average from (start, trajectory))
def _ema(rec):
    ema = AveragedModel(tiny_bert(), multi_avg_fn=get_ema_multi_avg_fn(0.6), use_buffers=False)
    return fed_average(ema, rec.points, tiny_bert)


def _swa(rec):  # steps 2, 4, 6
    return fed_average(AveragedModel(tiny_bert(), use_buffers=False), rec.points[1::2], tiny_bert)


def _lawa(rec):  # the mean of the snapshots at steps 4 and 6
    return {n: (rec.points[3][n] + rec.points[5][n]) / 2 for n in rec.start}


def _momentum(rec):
    slow = dict(rec.start)
    for point in rec.points:
        slow = {n: 0.7 * slow[n] + 0.3 * point[n] for n in slow}
    return slow


AVERAGES = {
    "ema": (lambda **kw: EMACallback(decay=0.6, **kw), _ema),
    "swa": (lambda **kw: SWACallback(start=2, update_every=2, update_bn=False, **kw), _swa),
    "lawa": (lambda **kw: LAWACallback(k=2, update_every=2, **kw), _lawa),
    "momentum": (lambda **kw: MomentumInterpolationCallback(momentum=0.7, **kw), _momentum),
}


def _run(tmp_path, callbacks, reverse, model=None, **args):
    rec = Recorder()
    model = model or tiny_bert()
    ordered = list(reversed(callbacks)) if reverse else list(callbacks)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=STEPS, **args),
                      train_dataset=token_dataset(), callbacks=[rec, *ordered])
    user_order = list(trainer.callback_handler.callbacks)
    trainer.train()
    assert trainer.callback_handler.callbacks == user_order  # nothing reorders the user's list
    assert "evaluate" not in vars(trainer)  # every evaluation wrapper removed, whichever was on top
    return trainer, rec


def _assert_weights(model, want, atol=1e-6):
    live = dict(model.named_parameters())
    for n, w in want.items():
        torch.testing.assert_close(live[n].detach(), w, atol=atol, rtol=0, msg=n)


def _wise(rec, end, alpha):
    return {n: (1 - alpha) * rec.start[n] + alpha * end[n] for n in rec.start}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", list(AVERAGES))
def test_average_copied_in_then_wise_ft_from_the_start(tmp_path, kind, reverse):
    make, reference = AVERAGES[kind]
    avg = make(copy_to_model_at_end=True, save_dir=None)
    wise = WiseFTCallback(alpha=0.5)
    trainer, rec = _run(tmp_path, [avg, wise], reverse)
    want = _wise(rec, reference(rec), 0.5)
    assert any(not torch.equal(want[n], rec.points[-1][n]) for n in want)
    _assert_weights(trainer.model, want)


@pytest.mark.parametrize("reverse", [False, True])
def test_sweep_scores_theta_alpha_between_start_and_the_average_copied_in(tmp_path, reverse):
    ds = token_dataset(16, seed=3)
    ema = EMACallback(decay=0.6, copy_to_model_at_end=True, save_dir=None)
    wise = WiseFTCallback(alphas=[0.0, 0.5, 1.0], eval_datasets={"id": ds}, metric="eval_loss",
                          greater_is_better=False, progress=False, save_curve=False)
    trainer, rec = _run(tmp_path, [ema, wise], reverse)
    end = _ema(rec)
    probe = tiny_bert().eval()
    batch = torch.tensor(ds["input_ids"]), torch.tensor(ds["labels"])
    losses = []
    for alpha in wise.curve.alphas:
        probe.load_state_dict(_wise(rec, end, alpha), strict=False)
        with torch.no_grad():
            losses.append(probe(input_ids=batch[0], labels=batch[1]).loss.item())
    assert wise.curve.results["id"] == pytest.approx(losses, rel=1e-5)
    chosen = wise.curve.alphas[losses.index(min(losses))]
    assert wise.curve.chosen_alpha == chosen
    _assert_weights(trainer.model, _wise(rec, end, chosen))


@pytest.mark.parametrize("reverse", [False, True])
def test_average_saved_then_another_copied_in(tmp_path, reverse):
    swa = SWACallback(start=2, update_every=2, update_bn=False, save_dir=str(tmp_path / "swa"))
    ema = EMACallback(decay=0.6, copy_to_model_at_end=True, save_dir=None)
    trainer, rec = _run(tmp_path, [swa, ema], reverse)
    _assert_weights(trainer.model, _ema(rec))
    saved = load_file(str(tmp_path / "swa" / "model.safetensors"))
    for n, w in _swa(rec).items():  # the saved SWA model is the SWA average, not touched by the EMA
        torch.testing.assert_close(saved[n], w, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("reverse", [False, True])
def test_average_saved_then_wise_ft_of_the_live_end(tmp_path, reverse):
    swa = SWACallback(start=2, update_every=2, update_bn=False, save_dir=str(tmp_path / "swa"))
    wise = WiseFTCallback(alpha=0.3)
    trainer, rec = _run(tmp_path, [swa, wise], reverse)
    _assert_weights(trainer.model, _wise(rec, rec.points[-1], 0.3))
    saved = load_file(str(tmp_path / "swa" / "model.safetensors"))
    for n, w in _swa(rec).items():
        torch.testing.assert_close(saved[n], w, atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("reverse", [False, True])
def test_two_averages_copied_in_are_refused_before_training(tmp_path, reverse):
    ema = EMACallback(decay=0.6, copy_to_model_at_end=True, save_dir=None)
    swa = SWACallback(start=2, copy_to_model_at_end=True, save_dir=None)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=STEPS),
                      train_dataset=token_dataset(), callbacks=[swa, ema] if reverse else [ema, swa])
    with pytest.raises(ValueError, match=r"copy_to_model_at_end.*(EMA|SWA)Callback, (EMA|SWA)Callback"):
        trainer.train()
    assert trainer.state.global_step == 0


# -- LoRA arithmetic: composes the adapter as the model finally holds it ---------------------------------
@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from tests.lora.conftest import make_adapter, save_base

    root = tmp_path_factory.mktemp("compose")
    base = save_base(root / "base")
    other = make_adapter(base, root / "other", 5, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    return base, other


def _lora_model(base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM.from_pretrained(base), config)


def _lm_data():
    from datasets import Dataset

    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _lora_ema(rec):
    ema = dict(rec.points[0])
    for point in rec.points[1:]:
        ema = {n: 0.6 * ema[n] + 0.4 * point[n] for n in ema}
    return ema


def _lora_wise(rec):  # the exact LoRA rule: B scaled by α, A kept at its end value
    return {n: 0.5 * t if "lora_B" in n else t for n, t in rec.points[-1].items()}


LORA_PAIRS = {
    "ema_copied_in": (lambda tmp: EMACallback(decay=0.6, copy_to_model_at_end=True, save_dir=None),
                      _lora_ema),
    "wise_ft": (lambda tmp: WiseFTCallback(alpha=0.5), _lora_wise),
    "swa_saved": (lambda tmp: SWACallback(start=1, save_dir=str(tmp / "swa")), lambda rec: rec.points[-1]),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("other_action", list(LORA_PAIRS))
def test_lora_arithmetic_composes_the_final_adapter(tmp_path, lora_setup, other_action, reverse):
    from robustft import LoRAArithmeticCallback
    from tests.lora.conftest import peft_deltas

    base, other = lora_setup
    make, final = LORA_PAIRS[other_action]
    lora = LoRAArithmeticCallback({"self": 1.0, str(other): -0.5})
    model = _lora_model(base)
    rec = Recorder()
    ordered = [make(tmp_path), lora]
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3, learning_rate=5e-2),
                      train_dataset=_lm_data(), callbacks=[rec, *(reversed(ordered) if reverse else ordered)])
    trainer.train()
    want = final(rec)
    _assert_weights(trainer.model, want)
    expected = _lora_model(base)
    with torch.no_grad():
        for n, p in expected.named_parameters():
            if n in want:
                p.copy_(want[n])
    expected.save_pretrained(tmp_path / "expected")
    refs = peft_deltas(base, {"e": tmp_path / "expected", "o": other, "c": tmp_path / "run" / "composed"})
    assert any(dw.abs().max() > 0 for dw in refs["e"].values())
    for module, got in refs["c"].items():
        torch.testing.assert_close(got, refs["e"].get(module, 0) - 0.5 * refs["o"].get(module, 0),
                                   atol=1e-5, rtol=1e-5)
