"""Error-message helpers: user values are quoted through ``short_repr`` so a message stays short whatever
the value (a YAML alias bomb, a huge list), instead of ``{value!r}`` which may expand without bound."""

from __future__ import annotations

import reprlib

__all__ = ["short_repr"]

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
