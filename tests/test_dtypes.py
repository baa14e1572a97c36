"""The numpy dtype arithmetic the streaming converter uses instead of torch matches torch bit for bit."""

import numpy as np
import pytest
import torch

from qwenforge.checkpoint.dtypes import STORAGE, code_of, from_float32, to_float32


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def test_bfloat16_round_trip_matches_torch():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(100_000, generator=generator) * torch.logspace(-30, 30, 100_000)
    # ties (exactly half way between two bfloat16 values), infinities and the largest floats
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), float("inf"), float("-inf"), 3.4e38, -3.4e38, 0.0, -0.0])
    values = torch.cat([values, ties])
    expected = _bits(values.to(torch.bfloat16))
    narrowed = from_float32(values.numpy(), "BF16")
    assert narrowed.dtype == STORAGE["BF16"]
    assert np.array_equal(narrowed, expected)
    assert np.array_equal(to_float32(expected, "BF16"), values.to(torch.bfloat16).float().numpy())


def test_nan_stays_nan_and_other_dtypes_use_numpy():
    assert np.isnan(to_float32(from_float32(np.array([np.nan], dtype=np.float32), "BF16"), "BF16")).all()
    half = from_float32(np.array([1.5, 65504.0], dtype=np.float32), torch.float16)
    assert half.dtype == np.float16 and half.tolist() == [1.5, 65504.0]


@pytest.mark.parametrize("given", ["BF16", "bfloat16", torch.bfloat16])
def test_code_of_accepts_every_spelling(given):
    assert code_of(given) == "BF16"


def test_code_of_refuses_unknown():
    with pytest.raises(ValueError, match="unsupported"):
        code_of("complex64")
