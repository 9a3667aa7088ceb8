"""Callback options are checked when the callback is built (naming the option), not when training fails."""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from robustft import (
    EMACallback,
    LAWACallback,
    MomentumInterpolationCallback,
    SWACallback,
    WiseFTCallback,
    callbacks,
)
from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback
from robustft.interpolation.wise_ft import WiseFTCurve, choose_alpha
from tests.callbacks.settings import NOT_RUN, SETTINGS

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: EMACallback(dtype="int8"), "dtype"),
        (lambda: EMACallback(dtype="float33"), "dtype"),
        (lambda: EMACallback(dtype=3), "dtype"),
        (lambda: EMACallback(device="bogus"), "device"),
        (lambda: EMACallback(device="meta"), "device"),
        (lambda: EMACallback(warmup=True, warmup_power=NAN), "warmup_power"),
        (lambda: EMACallback(warmup_gamma=INF), "warmup_gamma"),
        (lambda: EMACallback(decay=NAN), "decay"),
        (lambda: EMACallback(warmup="yes"), "warmup"),
        (lambda: EMACallback(update_every=True), "update_every"),
        (lambda: EMACallback(update_every=2.0), "update_every"),
        (lambda: EMACallback(start_step=-1), "start_step"),
        (lambda: EMACallback(copy_to_model_at_end="no"), "copy_to_model_at_end"),
        (lambda: EMACallback(buffers=1), "buffers"),
        (lambda: EMACallback(save_dir=3), "save_dir"),
        (lambda: EMACallback(restart_if_missing="yes"), "restart_if_missing"),
        (lambda: SWACallback(start=NAN), "start"),
        (lambda: SWACallback(start=True), "start"),
        (lambda: SWACallback(update_bn="no"), "update_bn"),
        (lambda: LAWACallback(k=2.0), "k"),
        (lambda: LAWACallback(k=True), "k"),
        (lambda: MomentumInterpolationCallback(momentum=NAN), "momentum"),
        (lambda: MomentumInterpolationCallback(reset_fast_at_task_boundary=None), "reset_fast_at_task"),
        (lambda: WiseFTCallback(alpha=NAN), "alpha"),
        (lambda: WiseFTCallback(alpha=0.5, snapshot_device="bogus"), "snapshot_device"),
        (lambda: WiseFTCallback(alpha=0.5, extrapolate="yes"), "extrapolate"),
        (lambda: WiseFTCallback(alpha=0.5, metric=None), "metric"),
        (lambda: LoRAArithmeticCallback({"self": NAN}), "weight of 'self'"),
        (lambda: LoRAArithmeticCallback({"self": INF}), "weight of 'self'"),
        (lambda: LoRAArithmeticCallback({"self": True}), "weight of 'self'"),
        (lambda: LoRAArithmeticCallback({"self": 1.0}, rank=True), "rank"),
        (lambda: LoRAArithmeticCallback({"self": 1.0}, evaluate="yes"), "evaluate"),
    ],
)
def test_bad_option_is_refused_at_construction(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_good_options_are_kept():
    assert EMACallback(dtype="bfloat16", device="cpu").dtype == "bfloat16"
    assert EMACallback(dtype=None).dtype is None
    assert SWACallback(start=0.5).start == 0.5 and SWACallback(start=3).start == 3


@pytest.mark.parametrize("bad", [NAN, INF])
def test_choose_alpha_never_chooses_a_non_finite_point(bad):
    alphas = [0.0, 0.5, 1.0]
    with pytest.warns(RuntimeWarning, match=r"not finite at α=\[0.0\]"):
        assert choose_alpha(alphas, [bad, 0.7, 0.8]) == 1.0
    with pytest.warns(RuntimeWarning, match=r"α=\[0.5\]"):  # loss-like: lower is better
        assert choose_alpha(alphas, [0.3, -bad if bad == INF else bad, 0.2], greater_is_better=False) == 1.0
    with pytest.warns(RuntimeWarning):  # a NaN tie-break (ID loss) is not used either
        assert choose_alpha(alphas, [NAN, 0.8, 0.8], tie_break=[0.1, NAN, 0.5]) == 1.0


def test_choose_alpha_with_no_finite_point_is_a_clear_error():
    with pytest.raises(ValueError, match="no finite metric value"):
        choose_alpha([0.0, 1.0], [NAN, NAN])


def test_curve_table_marks_a_non_finite_point():
    curve = WiseFTCurve(alphas=[0.0, 1.0], results={"id": [NAN, 0.5]}, metric="accuracy", id_dataset="id",
                        chosen_alpha=1.0)
    rows = curve.table().splitlines()
    assert "never chosen" in rows[2] and "never chosen" not in rows[3]


def test_finite_curve_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_alpha([0.0, 1.0], [0.5, math.nextafter(0.5, 1)]) == 1.0


# -- one rule for numeric options (robustft.checks.as_real), the same for every exported callback ------------
# (callback, option as named in the error, make(value), a valid value, integer option?)
NUMERIC = [
    ("BEMACallback", "update_freq", lambda v: callbacks.BEMACallback(update_freq=v), 4, True),
    ("BEMACallback", "update_after", lambda v: callbacks.BEMACallback(update_after=v), 2, True),
    ("BEMACallback", "ema_power", lambda v: callbacks.BEMACallback(ema_power=v), 0.25, False),
    ("BEMACallback", "bias_power", lambda v: callbacks.BEMACallback(bias_power=v), 0.25, False),
    ("BEMACallback", "lag", lambda v: callbacks.BEMACallback(lag=v), 2.5, False),
    ("BEMACallback", "multiplier", lambda v: callbacks.BEMACallback(multiplier=v), 2.5, False),
    ("BEMACallback", "min_ema_multiplier", lambda v: callbacks.BEMACallback(min_ema_multiplier=v), 0.25,
     False),
    ("ContinualBackpropCallback", "replacement_rate",
     lambda v: callbacks.ContinualBackpropCallback(replacement_rate=v), 0.5, False),
    ("ContinualBackpropCallback", "maturity_threshold",
     lambda v: callbacks.ContinualBackpropCallback(maturity_threshold=v), 4, True),
    ("ContinualBackpropCallback", "decay",
     lambda v: callbacks.ContinualBackpropCallback(decay=v), 0.5, False),
    ("EMACallback", "half_life", lambda v: EMACallback(half_life=v), 2.5, False),
    ("SWACallback", "swa_lr", lambda v: SWACallback(swa_lr=v), 0.25, False),
    ("SWACallback", "anneal_epochs", lambda v: SWACallback(swa_lr=0.1, anneal_epochs=v), 4, True),
    ("EMACallback", "decay", lambda v: EMACallback(decay=v), 0.9, False),
    ("EMACallback", "warmup_gamma", lambda v: EMACallback(warmup_gamma=v), 2.5, False),
    ("EMACallback", "warmup_power", lambda v: EMACallback(warmup_power=v), 0.75, False),
    ("EMACallback", "update_every", lambda v: EMACallback(update_every=v), 3, True),
    ("EMACallback", "start_step", lambda v: EMACallback(start_step=v), 2, True),
    ("EMAReferenceCallback", "decay", lambda v: callbacks.EMAReferenceCallback(decay=v), 0.9, False),
    ("EWCCallback", "strength", lambda v: callbacks.EWCCallback(v, fisher=FISHER), 0.25, False),
    ("EWCCallback", "fisher_max_examples",
     lambda v: callbacks.EWCCallback(1.0, fisher=FISHER, fisher_max_examples=v), 4, True),
    ("ForgettingCallback", "max_loss_increase",
     lambda v: callbacks.ForgettingCallback(RETAINED, max_loss_increase=v), 0.25, False),
    ("ForgettingCallback", "max_kl", lambda v: callbacks.ForgettingCallback(RETAINED, max_kl=v), 0.5, False),
    ("ForgettingCallback", "batch_size", lambda v: callbacks.ForgettingCallback(RETAINED, batch_size=v), 4,
     True),
    ("ForgettingCallback", "max_length", lambda v: callbacks.ForgettingCallback(RETAINED, max_length=v), 64,
     True),
    ("L2SPCallback", "strength", lambda v: callbacks.L2SPCallback(v), 0.25, False),
    ("LAWACallback", "k", lambda v: LAWACallback(k=v), 3, True),
    ("LAWACallback", "update_every", lambda v: LAWACallback(update_every=v), 10, True),
    ("LPFTCallback", "probe_steps", lambda v: callbacks.LPFTCallback(probe_steps=v), 5, True),
    ("LPFTCallback", "probe_epochs", lambda v: callbacks.LPFTCallback(probe_epochs=v), 2, True),
    ("LoRAArithmeticCallback", "weight of 'self'", lambda v: LoRAArithmeticCallback({"self": v}), -0.5,
     False),
    ("LoRAArithmeticCallback", "rank", lambda v: LoRAArithmeticCallback({"self": 1.0}, rank=v), 4, True),
    ("MomentumInterpolationCallback", "momentum", lambda v: MomentumInterpolationCallback(momentum=v), 0.9,
     False),
    ("MGPOCallback", "rho", lambda v: callbacks.MGPOCallback(rho=v), 0.125, False),
    ("MGPOCallback", "beta", lambda v: callbacks.MGPOCallback(beta=v), 0.5, False),
    ("MGPOCallback", "max_scale", lambda v: callbacks.MGPOCallback(max_scale=v), 2.5, False),
    ("MomentumSAMCallback", "rho", lambda v: callbacks.MomentumSAMCallback(rho=v), 0.125, False),
    ("MomentumSAMCallback", "start_step", lambda v: callbacks.MomentumSAMCallback(start_step=v), 3, True),
    ("RandomPerturbationCallback", "rho", lambda v: callbacks.RandomPerturbationCallback(rho=v), 0.125,
     False),
    ("RandomPerturbationCallback", "seed", lambda v: callbacks.RandomPerturbationCallback(seed=v), 3, True),
    ("SAMCallback", "rho", lambda v: callbacks.SAMCallback(rho=v), 0.125, False),
    ("SAMCallback", "eta", lambda v: callbacks.SAMCallback(eta=v), 0.5, False),
    ("SoupCallback", "last", lambda v: callbacks.SoupCallback(last=v), 2, True),
    ("SWACallback", "start", lambda v: SWACallback(start=v), 0.5, False),
    ("SWACallback", "start", lambda v: SWACallback(start=v), 3, True),
    ("SpectralRegCallback", "strength", lambda v: callbacks.SpectralRegCallback(v), 0.25, False),
    ("SpectralRegCallback", "power", lambda v: callbacks.SpectralRegCallback(1.0, power=v), 3, True),
    ("ShrinkPerturbCallback", "shrink", lambda v: _shrink(shrink=v), 0.5, False),
    ("ShrinkPerturbCallback", "sigma", lambda v: _shrink(sigma=v), 0.25, False),
    ("ShrinkPerturbCallback", "every_n_steps", lambda v: _shrink(every_n_steps=v, at_train_begin=False), 4,
     True),
    ("ShrinkPerturbCallback", "seed", lambda v: _shrink(seed=v), 4, True),
    ("SparseUpdateCallback", "density",
     lambda v: callbacks.SparseUpdateCallback(density=v, scores="magnitude"), 0.25, False),
    ("SparseUpdateCallback", "fisher_examples",
     lambda v: callbacks.SparseUpdateCallback(fisher_examples=v, fisher_data=[]), 16, True),
    ("WassersteinRegCallback", "strength", lambda v: callbacks.WassersteinRegCallback(v), 0.25, False),
    ("WiseFTCallback", "alpha", lambda v: WiseFTCallback(alpha=v), 0.25, False),
    ("WiseFTCallback", "alphas", lambda v: WiseFTCallback(alpha=0.5, alphas=[0.0, v]), 0.25, False),
    ("WiseFTCallback", "n_components", lambda v: WiseFTCallback(alpha=0.5, n_components=v), 2, True),
]


def _shrink(**options):
    return callbacks.ShrinkPerturbCallback(**{"shrink": 0.5, "sigma": 0.1, "at_train_begin": True, **options})


#: exported callbacks with no numeric option
NO_NUMBERS = {"RobustCallback"}
FISHER = {"w": torch.ones(2)}
RETAINED = [{"prompt": "Q\n", "completion": "A"}]


def test_the_matrix_covers_every_exported_callback():
    exported = {n for n in callbacks.__all__ if n.endswith("Callback")}
    assert exported == {case[0] for case in NUMERIC} | NO_NUMBERS


def test_the_matrix_names_the_callbacks_of_the_settings_table():
    """The option matrix and the settings table (tests/callbacks/settings.py) cover the same callbacks."""
    assert {case[0] for case in NUMERIC} | NO_NUMBERS == {s.name for s in SETTINGS} | set(NOT_RUN)


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]}-{'int' if case[4] else 'real'}"


def _state(callback) -> dict[str, str]:
    """What the constructor kept, as reprs (a numpy or torch scalar kept as such reprs differently)."""
    return {k: repr(v) for k, v in vars(callback).items()}


@pytest.mark.parametrize("case", NUMERIC, ids=_case_id)
def test_str_and_bool_are_not_numbers(case):
    _, option, make, good, integer = case
    make(good)
    bad_values = [str(good), True, False, np.bool_(True), torch.tensor(True), torch.tensor([good])]
    if integer:  # an integer option takes an integral value: 3.0 is refused (SWA reads 3 and 0.5 differently)
        bad_values += [float(good), np.float64(good), torch.tensor(float(good))]
    for bad in bad_values:
        with pytest.raises(ValueError, match=re.escape(option)):
            make(bad)


@pytest.mark.parametrize("case", NUMERIC, ids=_case_id)
def test_numpy_and_torch_scalars_are_the_plain_number(case):
    _, option, make, good, integer = case
    kinds = [np.int64, np.int32, lambda v: torch.tensor(v), np.array] if integer else [
        np.float32, np.float64, lambda v: torch.tensor(v), lambda v: torch.tensor(v, dtype=torch.float64),
        np.array]
    for kind in kinds:
        value = kind(good)
        plain = value.item()
        assert type(plain) is (int if integer else float) and plain == pytest.approx(good)
        assert _state(make(value)) == _state(make(plain)), kind


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda p: WiseFTCallback(alpha=0.5, include=p), "include"),
        (lambda p: WiseFTCallback(alpha=0.5, exclude=p), "exclude"),
        (lambda p: EMACallback(include=p), "include"),
        (lambda p: SWACallback(exclude=p), "exclude"),
        (lambda p: LAWACallback(include=[r"\.weight$", p]), "include"),
        (lambda p: MomentumInterpolationCallback(include=p), "include"),
        (lambda p: callbacks.EMAReferenceCallback(exclude=p), "exclude"),
        (lambda p: callbacks.L2SPCallback(1.0, include=p), "include"),
        (lambda p: callbacks.EWCCallback(1.0, fisher=FISHER, exclude=p), "exclude"),
        (lambda p: callbacks.SpectralRegCallback(1.0, include=p), "include"),
        (lambda p: callbacks.WassersteinRegCallback(1.0, exclude=p), "exclude"),
        (lambda p: callbacks.SAMCallback(include=p), "include"),
        (lambda p: callbacks.MGPOCallback(include=p), "include"),
        (lambda p: callbacks.MomentumSAMCallback(include=p), "include"),
        (lambda p: callbacks.RandomPerturbationCallback(exclude=p), "exclude"),
        (lambda p: callbacks.ShrinkPerturbCallback(0.5, 0.1, at_train_begin=True, include=p), "include"),
        (lambda p: callbacks.SparseUpdateCallback(scores="magnitude", exclude=p), "exclude"),
        (lambda p: callbacks.LPFTCallback(probe_steps=2, head=p), "head"),
    ],
)
def test_a_bad_pattern_is_refused_at_construction(make, option):
    for bad in ("(", "[a-", 3, [r"ok", 3]):
        with pytest.raises(ValueError, match=rf"^{option}"):
            make(bad)
