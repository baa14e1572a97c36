"""Tensor dtypes by their safetensors names ("BF16"), and the little arithmetic streaming needs, in numpy.

Copying and re-indexing a checkpoint never imports torch: its import takes 1.6-2 s, more than
copying 2 GB, and the converter's target is the wall time of `cp`. numpy has no bfloat16, but a
bfloat16 is the high half of a float32: widening is a shift, narrowing rounds to nearest even as
torch does. (ml_dtypes has the type, but its import alone takes 0.6 s.)
"""

from __future__ import annotations

import numpy as np

NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
STORAGE = {code: np.dtype(np.uint16 if code == "BF16" else name) for code, name in NAMES.items()}  # numpy dtype of the bytes
_CODES = {name: code for code, name in NAMES.items()}


def code_of(dtype) -> str:
    """'BF16' from 'BF16', 'bfloat16' or torch.bfloat16 (no torch import needed)."""
    text = str(dtype).removeprefix("torch.")
    if text in SIZES:
        return text
    if text in _CODES:
        return _CODES[text]
    raise ValueError(f"unsupported tensor dtype {dtype}")


WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # what a written or loaded model's weights may be


def weight_dtype(dtype: str | None, flag: str = "--dtype") -> str | None:
    """The one check of a weight dtype string (None: the caller's default): float32, bfloat16 or float16."""
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        from qwenforge.errors import QwenforgeError

        raise QwenforgeError(f"{flag} {dtype}: choose float32, bfloat16 or float16")
    return dtype


def torch_dtype(dtype):
    import torch

    return getattr(torch, NAMES[code_of(dtype)])


def to_float32(raw: np.ndarray, dtype) -> np.ndarray:
    """Stored values (as `STORAGE` arrays) widened to float32, exactly."""
    if code_of(dtype) == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def from_float32(values: np.ndarray, dtype) -> np.ndarray:
    """float32 values narrowed to the stored form of `dtype` (bfloat16: round to nearest even, like torch)."""
    code = code_of(dtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if code != "BF16":
        return values.astype(STORAGE[code])
    bits = values.view(np.uint32)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    out[np.isnan(values)] = 0x7FC0
    return out
