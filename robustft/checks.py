"""One home for checking user values and quoting them in errors.

Every option check (merge recipes, ``robustft lora`` values, callback constructors) raises a ValueError that
names the option; user values are quoted through ``short_repr`` so a message stays short whatever the value
(a YAML alias bomb, a huge list), where ``{value!r}`` could expand without bound. Standard library only.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

__all__ = [
    "check_bool",
    "check_count",
    "check_density",
    "check_drop_rate",
    "check_fraction",
    "check_integer",
    "check_non_negative",
    "check_number",
    "check_path",
    "short_repr",
]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 80
_REPR.maxlong = 40
_REPR.maxother = 80
for _name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _name, 6)


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` bounded in depth, items and length (``...`` marks what was left out)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- value checks: (option name, value) -> None, or a ValueError naming the option ---------------------------
def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """A finite real number (an int when ``integer``; bool, NaN and ±inf refused) within the bounds."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "integer" if integer else "number"
        raise ValueError(f"{name} must be a finite {what}, got {short_repr(value)}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {short_repr(value)}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {short_repr(value)}")


def check_fraction(name: str, value: Any, upper_open: bool = False, lower_open: bool = False) -> None:
    """A number in [0, 1] (ends excluded when asked)."""
    check_number(name, value)
    low_ok = value > 0 if lower_open else value >= 0
    high_ok = value < 1 if upper_open else value <= 1
    if not (low_ok and high_ok):
        interval = ("(" if lower_open else "[") + "0, 1" + (")" if upper_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {short_repr(value)}")


def check_density(name: str, value: Any) -> None:
    """Fraction of entries kept, in (0, 1]: 0 would keep nothing."""
    check_fraction(name, value, lower_open=True)


def check_drop_rate(name: str, value: Any) -> None:
    """DARE drop probability, in [0, 1): 1 would drop everything and divide by zero."""
    check_fraction(name, value, upper_open=True)


def check_non_negative(name: str, value: Any) -> None:
    check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {short_repr(value)}")


def check_bool(name: str, value: Any) -> None:
    """True or False only (a string "no" would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {short_repr(value)}")


def check_count(name: str, value: Any) -> None:
    """A non-negative integer (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {short_repr(value)}")


def check_integer(name: str, value: Any) -> None:
    """An integer (bool refused), e.g. a seed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")


def check_path(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path string, got {short_repr(value)}")
