"""ops/dtypes.py: the compute-dtype rule (float32, float64 when an input is float64) against its statement."""

import itertools

import pytest
import torch

from robustft.ops.dtypes import compute_dtype

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _rule(dtypes):
    """The documented rule written out: float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_compute_dtype_is_float32_unless_an_input_is_float64(n):
    for dtypes in itertools.product(FLOATS, repeat=n):
        assert compute_dtype(*dtypes) == _rule(dtypes), dtypes


def test_half_types_are_upcast_and_the_result_computes_exactly_in_float64():
    a = torch.tensor([1 + 2 ** -40], dtype=torch.float64)
    b = torch.tensor([1.0], dtype=torch.bfloat16)
    dtype = compute_dtype(a.dtype, b.dtype)
    assert (a.to(dtype) - b.to(dtype)).item() == 2 ** -40
