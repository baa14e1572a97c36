"""K-quants (Q4_K, Q5_K, Q6_K ...) by llama.cpp's own C quantizer, from the `xllamacpp` extra.

gguf-py quantizes Q8_0/Q4_0/Q5_0 in numpy but only dequantizes the K-quants, so those go through
`ggml_quantize_chunk`, which the prebuilt llama.cpp engine wheel (`xllamacpp`, installed by
`pip install 'qwenforge[xllamacpp]'`) exports from its shared library.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

from qwenforge.errors import QwenforgeError

ENGINE = "xllamacpp"  # the package of the `xllamacpp` extra


def engine_available() -> bool:
    return importlib.util.find_spec(ENGINE) is not None


@functools.cache
def _quantize_chunk():
    spec = importlib.util.find_spec(ENGINE)
    if spec is None:
        raise QwenforgeError(
            "K-quant types (q4_k_m) need llama.cpp's quantizer: pip install 'qwenforge[xllamacpp]' "
            "(or export --type q8_0 / q4_0, which need nothing more)"
        )
    libraries = sorted(Path(next(iter(spec.submodule_search_locations))).glob("xllamacpp*.so"))
    function = ctypes.CDLL(str(libraries[0])).ggml_quantize_chunk
    # size_t ggml_quantize_chunk(type, const float *src, void *dst, int64 start, int64 nrows, int64 n_per_row, const float *imatrix)
    function.restype = ctypes.c_size_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return function


def quantize_rows(values: np.ndarray, qtype, bytes_per_row: int) -> np.ndarray:
    """Rows of float32 `values` (2-D) quantized to `qtype` (a gguf GGMLQuantizationType) by llama.cpp."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, columns = values.shape
    out = np.empty((rows, bytes_per_row), dtype=np.uint8)
    written = _quantize_chunk()(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, columns, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out
