"""Source tensors as views into memory-mapped shards, released after use: one copy, bounded RSS.

A copied tensor goes from the source's page cache straight into the output file's `write`
(no intermediate buffer, unlike `safe_open(...).get_tensor`), and `release` drops its pages
from this process (MADV_DONTNEED on a private read-only mapping: later reads refetch the
file), so resident memory stays at the tensors in flight, not the shards read so far.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from qwenforge.checkpoint.dtypes import STORAGE, torch_dtype
from qwenforge.checkpoint.safetensors_io import list_tensors
from qwenforge.errors import QwenforgeError

PAGE = mmap.PAGESIZE


class MappedReader:
    """`TensorReader`'s interface (`.tensors`, `.get`, `in`) plus `release(name)`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors = list_tensors(self.folder)  # validates headers, sizes and shards
        self._maps: dict[Path, mmap.mmap] = {}
        self._spans: dict[str, tuple[Path, int, int]] = {}
        for file in sorted({info.file for info in self.tensors.values()}):
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            for name, entry in header.items():
                if name != "__metadata__":
                    begin, end = entry["data_offsets"]
                    self._spans[name] = (file, 8 + length + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def span(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of the tensor's data, for in-kernel copies."""
        return self._spans[name]

    def array(self, name: str) -> np.ndarray:
        """A numpy view (no copy) of the tensor's stored values in the mapped file (bfloat16 as
        uint16 bits: checkpoint/dtypes.py); no torch needed."""
        info = self.tensors.get(name)
        if info is None:
            raise QwenforgeError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        file, start, size = self._spans[name]
        dtype = STORAGE[info.dtype]
        return np.frombuffer(self._maps[file], dtype=dtype, count=size // dtype.itemsize, offset=start).reshape(info.shape)

    def rows(self, name: str, ids: list[int]) -> np.ndarray:
        """Rows of a 2-D tensor (stored values) read with pread, not through the mapping: touching
        scattered rows of a mapping maps whole neighbourhoods into this process (fault-around)."""
        info = self.tensors[name]
        dtype = STORAGE[info.dtype]
        file, start, size = self._spans[name]
        row_bytes = size // info.shape[0]
        out = np.empty((len(ids), info.shape[1]), dtype=dtype)
        with open(file, "rb") as handle:
            for position, row in enumerate(ids):
                out[position] = np.frombuffer(os.pread(handle.fileno(), row_bytes, start + row * row_bytes), dtype=dtype)
        return out

    def get(self, name: str):
        """A torch view (no copy) of the tensor in the mapped file."""
        import torch

        return torch.from_numpy(self.array(name)).view(torch_dtype(self.tensors[name].dtype))

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Drop the tensor's pages (or those of rows [first, last)) from this process's memory.

        Only whole pages inside the span are dropped, so neighbouring tensors are untouched.
        """
        file, start, size = self._spans[name]
        if rows is not None:
            shape = self.tensors[name].shape
            row_bytes = size // shape[0]
            start, size = start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        first = -(-start // PAGE) * PAGE
        last = (start + size) // PAGE * PAGE
        if last > first:
            self._maps[file].madvise(mmap.MADV_DONTNEED, first, last - first)
