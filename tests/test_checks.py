"""``robustft.checks``: one rule for numbers (real numbers incl. numpy / 0-d torch scalars; never str or
bool), integers, and name patterns compiled where they are given."""

from __future__ import annotations

import decimal
import fractions
import math

import numpy as np
import pytest
import torch

from robustft.checks import as_real, check_count, check_integer, check_number, compile_patterns
from robustft.ops.interpolate import check_alpha, check_weights


@pytest.mark.parametrize(
    "value, plain",
    [
        (1, 1), (1.5, 1.5), (np.float32(0.5), 0.5), (np.float64(0.1), 0.1), (np.float16(2), 2.0),
        (np.int64(3), 3), (np.uint8(7), 7), (torch.tensor(0.25), 0.25), (torch.tensor(3), 3),
        (torch.tensor(0.5, dtype=torch.bfloat16), 0.5), (torch.tensor(0.75, requires_grad=True), 0.75),
        (np.array(2.5), 2.5), (np.array(4), 4), (fractions.Fraction(1, 4), 0.25),
        (decimal.Decimal("0.5"), 0.5),
    ],
)
def test_real_numbers_become_the_plain_python_number(value, plain):
    got = as_real(value)
    assert type(got) is type(plain) and got == plain
    assert check_number("x", value) == plain and type(check_number("x", value)) is type(plain)


@pytest.mark.parametrize(
    "value",
    ["0.5", b"1", True, False, np.bool_(True), torch.tensor(True), 1 + 2j, np.complex64(1),
     torch.tensor([0.5]), np.array([1.0]), None, [0.5], torch.empty((), device="meta")],
)
def test_what_is_not_a_real_number_is_refused_naming_the_option(value):
    assert as_real(value) is None
    with pytest.raises(ValueError, match="^my_option must be a finite number"):
        check_number("my_option", value)


def test_integers():
    assert check_number("k", np.int32(4), low=1, integer=True) == 4
    assert check_integer("seed", torch.tensor(-3)) == -3 and check_count("n", np.uint16(0)) == 0
    for bad in (3.0, np.float64(3.0), torch.tensor(3.0), True, "3"):
        with pytest.raises(ValueError, match="^k must be a finite integer"):
            check_number("k", bad, integer=True)
        with pytest.raises(ValueError, match="^seed must be an integer"):
            check_integer("seed", bad)
    assert check_number("big", 10**400, integer=True) == 10**400  # no float overflow
    for bad in (math.inf, math.nan, np.float32("nan"), torch.tensor(math.inf)):
        with pytest.raises(ValueError, match="finite"):
            check_number("x", bad)


def test_interpolation_weights_and_alpha_follow_the_same_rule():
    assert check_alpha(np.float32(0.5)) == 0.5 and check_alpha(torch.tensor(1)) == 1.0
    for bad in ("0.5", True):
        with pytest.raises(ValueError, match="^alpha must be a finite number"):
            check_alpha(bad)
    assert check_weights([np.float64(1), torch.tensor(2.0)], 2) == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"^weights\[1\] must be a finite number"):
        check_weights([1.0, "2"], 2)


def test_patterns_are_compiled_where_given():
    assert [p.pattern for p in compile_patterns("include", ["a", r"\.b$"])] == ["a", r"\.b$"]
    assert compile_patterns("include", None) == [] and compile_patterns("include", ()) == []
    with pytest.raises(ValueError, match=r"^exclude: '\(' is not a valid regular expression"):
        compile_patterns("exclude", "(")
    for bad in (3, [r"ok", 3], {"a": 1}):
        with pytest.raises(ValueError, match="^include must be a regular expression or a list"):
            compile_patterns("include", bad)
