"""Callback options are checked when the callback is built (naming the option), not when training fails."""

import math
import warnings

import pytest

from robustft import EMACallback, LAWACallback, MomentumInterpolationCallback, SWACallback, WiseFTCallback
from robustft.callbacks.lora_arithmetic import LoRAArithmeticCallback
from robustft.wise_ft import WiseFTCurve, choose_alpha

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
