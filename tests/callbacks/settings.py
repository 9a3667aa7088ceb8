"""The callbacks' settings table (Composer-style): each exported callback with constructor arguments for a
tiny run, the model it needs and any special setup. tests/callbacks/test_matrix.py drives the shared checks
(restore on error, resume bit-exact, order independence with WiseFTCallback and EMACallback) from it, and
tests/callbacks/test_options.py checks that its option matrix names the same callbacks: a new callback
gets them all by adding one row to ``SETTINGS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from robustft import callbacks
from tests.tiny import tiny_bert, token_dataset, training_args

#: the models a row can ask for, all trained on ``tests.tiny.token_dataset``
CLASSIFIER, LORA, TRL = "classifier", "lora", "trl"
#: the shared checks of tests/callbacks/test_matrix.py, for ``Setting.skip``
FAILURE, RESUME, ORDER = "failure", "resume", "order"


@dataclass(frozen=True)
class Setting:
    """One exported callback: ``make(model)`` builds it for a tiny run on a fresh ``model`` (the model is
    given for setups that read an initial state); ``skip`` maps a check it cannot take to the reason,
    ``xfail`` a check it fails to the bug (strict: fixing the bug makes the matrix say so)."""

    name: str
    make: Callable[[nn.Module], TrainerCallback]
    model: str = CLASSIFIER
    setup: str = ""
    skip: dict[str, str] = field(default_factory=dict)
    xfail: dict[str, str] = field(default_factory=dict)


def tiny_lora(seed: int = 0) -> nn.Module:
    """The tiny BERT classifier with a PEFT LoRA adapter (rank 2) on its attention query and value."""
    from peft import LoraConfig, get_peft_model

    model = tiny_bert(seed)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]))


MODELS: dict[str, Callable[[], nn.Module]] = {CLASSIFIER: tiny_bert, LORA: tiny_lora}

def _unit_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    """A Fisher of ones for every parameter of ``model`` (EWC's anchor is then L2-SP's, weighted)."""
    return {n: torch.ones_like(p) for n, p in model.named_parameters()}


_TRL = "needs a TRL DPOTrainer with a reference model (tests/callbacks/test_ema_reference.py)"
_COPIED_IN = "copies its average into the model at the end like EMACallback: two such are refused by design"

SETTINGS: list[Setting] = [
    Setting("BEMACallback", lambda m: callbacks.BEMACallback(update_freq=1, lag=2),
            skip={ORDER: _COPIED_IN}),
    Setting("ContinualBackpropCallback",
            lambda m: callbacks.ContinualBackpropCallback(replacement_rate=0.1, maturity_threshold=1,
                                                          decay=0.9)),
    Setting("EMACallback", lambda m: callbacks.EMACallback(decay=0.7)),
    Setting("EMAReferenceCallback", lambda m: callbacks.EMAReferenceCallback(decay=0.7), model=TRL,
            setup="a reference model (TRL)", skip={FAILURE: _TRL, RESUME: _TRL, ORDER: _TRL}),
    Setting("EWCCallback", lambda m: callbacks.EWCCallback(0.5, fisher=_unit_fisher(m)),
            setup="a Fisher of the initial state"),
    # the matrix runs evaluate nothing: the row checks that watching never changes training or its files
    # (its scores are tested in tests/callbacks/test_forgetting.py)
    Setting("ForgettingCallback",
            lambda m: callbacks.ForgettingCallback([{"prompt": "Q\n", "completion": "A"}], metrics="loss")),
    Setting("L2SPCallback", lambda m: callbacks.L2SPCallback(0.5)),
    Setting("LAWACallback", lambda m: callbacks.LAWACallback(k=2, update_every=1),
            skip={ORDER: _COPIED_IN}),
    Setting("LPFTCallback", lambda m: callbacks.LPFTCallback(probe_steps=2)),
    Setting("LoRAArithmeticCallback", lambda m: callbacks.LoRAArithmeticCallback({"self": 0.5}), model=LORA),
    Setting("MGPOCallback", lambda m: callbacks.MGPOCallback(rho=0.05), model=LORA),
    Setting("MomentumInterpolationCallback", lambda m: callbacks.MomentumInterpolationCallback(momentum=0.5)),
    Setting("MomentumSAMCallback", lambda m: callbacks.MomentumSAMCallback(rho=0.05)),
    Setting("RandomPerturbationCallback", lambda m: callbacks.RandomPerturbationCallback(rho=0.05, seed=3)),
    Setting("SAMCallback", lambda m: callbacks.SAMCallback(rho=0.05)),
    Setting("ShrinkPerturbCallback", lambda m: callbacks.ShrinkPerturbCallback(0.5, 0.01, every_n_steps=2)),
    Setting("SparseUpdateCallback",
            lambda m: callbacks.SparseUpdateCallback(density=0.25, scores="magnitude")),
    Setting("SoupCallback", lambda m: callbacks.SoupCallback(last=2)),
    Setting("SpectralRegCallback", lambda m: callbacks.SpectralRegCallback(0.5)),
    Setting("SWACallback", lambda m: callbacks.SWACallback(start=1), skip={ORDER: _COPIED_IN}),
    Setting("WassersteinRegCallback", lambda m: callbacks.WassersteinRegCallback(0.5)),
    Setting("WiseFTCallback", lambda m: callbacks.WiseFTCallback(alpha=0.5)),
]

#: exported names that are no callback to run (the base class)
NOT_RUN = {"RobustCallback": "the base class: no behaviour of its own"}


def exported_callbacks() -> set[str]:
    """Every exported ``...Callback`` name of ``robustft.callbacks``."""
    return {n for n in callbacks.__all__ if n.endswith("Callback")}


def params(check: str) -> list:
    """The rows as pytest parameters for ``check``; a row that cannot take it is skipped with its reason."""
    return [pytest.param(s, id=s.name, marks=_marks(s, check)) for s in SETTINGS]


def _marks(setting: Setting, check: str) -> list:
    if check in setting.skip:
        return [pytest.mark.skip(reason=setting.skip[check])]
    if check in setting.xfail:
        return [pytest.mark.xfail(strict=True, reason=setting.xfail[check])]
    return []


def train(model: nn.Module, out, callbacks: list, resume=None, **args) -> Trainer:
    """One Trainer run of ``model`` on the tiny token data (``tests.tiny.training_args`` with ``args``)."""
    trainer = Trainer(model=model, args=training_args(out, **args), train_dataset=token_dataset(),
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def saved_files(root: Path, skip: tuple[str, ...] = ("checkpoint-",)) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), leaving out the Trainer's checkpoints."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(skip) for part in p.relative_to(root).parts)}


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same names, and every tensor equal bit for bit."""
    assert set(got) == set(want)
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]!r}"
