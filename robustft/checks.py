"""One home for checking user values and quoting them in errors.

Every option check (merge recipes, ``robustft lora`` values, callback constructors) raises a ValueError that
names the option; user values are quoted through ``short_repr`` so a message stays short whatever the value
(a YAML alias bomb, a huge list), where ``{value!r}`` could expand without bound. Standard library only.

One rule for numbers (:func:`as_real`): a real number is a Python int or float, a numpy scalar or a 0-d real
numpy array or torch tensor; a str ("0.5"), a bool (``True`` is 1 to Python, never a weight) or a complex
value is not. An integer option takes an integral value (numpy and 0-d torch integers included); a float such
as ``3.0`` is refused there, because some options read a float and an int differently (SWA's ``start``: a
fraction of the run or a step). The checks return the plain Python int or float, which is what callers keep.
"""

from __future__ import annotations

import decimal
import math
import numbers
import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "as_real",
    "check_bool",
    "check_count",
    "check_density",
    "check_drop_rate",
    "check_fraction",
    "check_id_dataset",
    "check_integer",
    "check_non_negative",
    "check_number",
    "check_path",
    "compile_patterns",
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


# -- value checks: (option name, value) -> the value as plain Python, or a ValueError naming the option ------
def as_real(value: Any) -> int | float | None:
    """The Python int or float of a real scalar (Python, numpy, 0-d real numpy array or torch tensor) or None.

    None for str, bool (also numpy/torch bools), complex and anything with elements: they are not numbers.
    """
    if isinstance(value, (bool, str, bytes)):
        return None
    if isinstance(value, (int, float)):  # numpy.float64 is a float subclass
        return int(value) if isinstance(value, int) else float(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # numpy/torch scalars
        try:
            item = value.item()
        except Exception:  # a meta tensor has no value
            return None
        return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, (numbers.Real, decimal.Decimal)):  # fractions.Fraction, decimal.Decimal
        return float(value)
    return None


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> int | float:
    """``value`` as a Python int/float if it is a finite real number (:func:`as_real`; an integral one when
    ``integer``) within the bounds; else a ValueError naming ``name``."""
    real = as_real(value)
    finite = not isinstance(real, float) or math.isfinite(real)
    if real is None or (integer and not isinstance(real, int)) or not finite:
        what = "integer" if integer else "number"
        raise ValueError(f"{name} must be a finite {what}, got {short_repr(value)}")
    if low is not None and (real <= low if low_open else real < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {short_repr(value)}")
    if high is not None and (real >= high if high_open else real > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {short_repr(value)}")
    return real


def check_fraction(name: str, value: Any, upper_open: bool = False, lower_open: bool = False) -> int | float:
    """A number in [0, 1] (ends excluded when asked)."""
    real = check_number(name, value)
    low_ok = real > 0 if lower_open else real >= 0
    high_ok = real < 1 if upper_open else real <= 1
    if not (low_ok and high_ok):
        interval = ("(" if lower_open else "[") + "0, 1" + (")" if upper_open else "]")
        raise ValueError(f"{name} must be in {interval}, got {short_repr(value)}")
    return real


def check_density(name: str, value: Any) -> int | float:
    """Fraction of entries kept, in (0, 1]: 0 would keep nothing."""
    return check_fraction(name, value, lower_open=True)


def check_drop_rate(name: str, value: Any) -> int | float:
    """DARE drop probability, in [0, 1): 1 would drop everything and divide by zero."""
    return check_fraction(name, value, upper_open=True)


def check_non_negative(name: str, value: Any) -> int | float:
    """A finite number >= 0."""
    return check_number(name, value, low=0)


def check_bool(name: str, value: Any) -> bool:
    """True or False only (a string "no" would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {short_repr(value)}")
    return value


def check_count(name: str, value: Any) -> int:
    """A non-negative integer (bool refused)."""
    real = as_real(value)
    if not isinstance(real, int) or real < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {short_repr(value)}")
    return real


def check_id_dataset(eval_datasets: Mapping[str, Any], id_dataset: str | None) -> str | None:
    """The in-distribution set among ``eval_datasets`` (default: the only one); None without eval sets."""
    if not eval_datasets:
        return id_dataset
    if id_dataset is None and len(eval_datasets) == 1:
        id_dataset = next(iter(eval_datasets))
    if id_dataset not in eval_datasets:
        raise ValueError(
            f"id_dataset: {id_dataset!r} must name the in-distribution set among eval_datasets "
            f"{sorted(eval_datasets)}"
        )
    return id_dataset


def check_integer(name: str, value: Any) -> int:
    """An integer (bool refused), e.g. a seed."""
    real = as_real(value)
    if not isinstance(real, int):
        raise ValueError(f"{name} must be an integer, got {short_repr(value)}")
    return real


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """``value`` is one of ``allowed`` (bool refused where ints are allowed); else a ValueError naming
    ``name``."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {short_repr(value)}")


def compile_patterns(name: str, value: str | Sequence[str] | None) -> list[re.Pattern]:
    """The regular expressions of a name-pattern option (None, a str or a sequence of str), compiled now so
    a bad pattern is refused where the option is given, naming it."""
    if value is None:
        return []
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        values = list(value)
    else:
        raise ValueError(f"{name} must be a regular expression or a list of them, got {short_repr(value)}")
    patterns = []
    for v in values:
        try:
            patterns.append(re.compile(v))
        except re.error as err:
            raise ValueError(f"{name}: {short_repr(v)} is not a valid regular expression ({err})") from err
    return patterns


def check_path(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a path string, got {short_repr(value)}")
