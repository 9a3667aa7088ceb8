"""The one compute-dtype rule of the package: float32, or float64 when an input is float64."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32, or the widest of ``dtypes`` when wider (float64): half types are upcast, float64 stays."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out
