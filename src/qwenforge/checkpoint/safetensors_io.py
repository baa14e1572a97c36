"""Streaming read and write of sharded safetensors checkpoints.

Reading is lazy (safetensors' `safe_open`), one tensor at a time. Writing streams too: the
safetensors library can only save a whole dict at once, so `ShardedWriter` writes each shard's
header from the planned shapes first and then appends tensors one by one. Peak memory is the
largest single tensor, never a shard or the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from qwenforge.checkpoint.dtypes import SIZES, code_of
from qwenforge.errors import QwenforgeError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: "BF16", "F32", ... (checkpoint/dtypes.py)
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SIZES[self.dtype]


def _read_header(file: Path) -> dict:
    """The header of a safetensors file, validated by the safetensors library itself (offsets in order,
    contiguous and covering the file, each tensor's byte size matching its dtype and shape), so a
    file it would refuse is never read here with another tensor's bytes."""
    try:
        with safe_open(str(file), framework="numpy"):
            pass  # opening parses and validates the header (and maps, not reads, the data)
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(length))
    except (OSError, ValueError, SafetensorError) as error:
        reason = str(error).removeprefix("Error while deserializing header: ")
        raise QwenforgeError(f"{file}: not a readable safetensors file ({reason}); re-download or re-export it") from error


def shard_names(index: Path) -> set[str]:
    """The shard file names of an index.json, each a file inside the index's own folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise QwenforgeError(f"{index}: malformed index ({error}); rebuild it or remove it") from error
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise QwenforgeError(f"{index}: 'weight_map' must map tensor names to shard file names; rebuild it or remove it")
    for name in weight_map.values():
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] in ("..", "."):  # "." is the folder itself
            raise QwenforgeError(f"{index}: shard {name!r} lies outside the checkpoint folder; shards must be files inside it")
    return set(weight_map.values())


def list_tensors(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder (sharded with an index, or one file), without loading them."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        files = sorted({folder / name for name in shard_names(index)})
    elif (folder / SINGLE_NAME).exists():
        files = [folder / SINGLE_NAME]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise QwenforgeError(
                f"{folder}: only pickle checkpoints (*.bin/*.pt) found; qwenforge reads safetensors only "
                "(convert them with transformers' save_pretrained(safe_serialization=True))"
            )
        raise QwenforgeError(f"{folder}: no *.safetensors weights found")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.exists():
            raise QwenforgeError(f"{file}: shard listed in {INDEX_NAME} is missing; download it again")
        for name, info in _read_header(file).items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SIZES:
                raise QwenforgeError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            tensors[name] = TensorInfo(name, tuple(info["shape"]), info["dtype"], file)
    return tensors


class TensorReader:
    """Lazy access to a folder's tensors; keeps shard handles open, loads one tensor per call."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors = list_tensors(self.folder)
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str):
        """The tensor (torch; safetensors imports torch on first use)."""
        info = self.tensors.get(name)
        if info is None:
            raise QwenforgeError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(name)

    def __iter__(self) -> Iterator[tuple[str, object]]:
        for name in self.tensors:
            yield name, self.get(name)


def parse_memory(max_memory: str | int | None) -> int | None:
    """Bytes of a --max-memory value (e.g. 16GiB, 500MB, or an int), None kept; one line when it is not a size."""
    if max_memory is None or isinstance(max_memory, int):
        return max_memory
    try:
        return parse_size(max_memory)
    except QwenforgeError:
        raise QwenforgeError(f"--max-memory {max_memory}: not a size; give e.g. 16GiB or 500MB") from None


def parse_size(size: str | int) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise QwenforgeError(f"size {size!r} not understood; use e.g. 5GB, 500MB or 16GiB") from None


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list]:
    """Group (name, shape, dtype code) entries, in order, into shards of at most max_shard_bytes."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * SIZES[entry[2]]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors into shards, streaming: `write(name, tensor)` in plan order, then `close()`.

    The plan (names, shapes, dtypes as torch dtypes or safetensors names) is fixed up front so
    every shard's header can be written before its data; a tensor that differs from its plan is a
    bug and raises. Files are not fsynced: like `cp` and `save_pretrained`, the writer leaves that
    to the kernel; a killed run is covered by writing into a temporary folder.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...], object]], max_shard_size="5GB"):
        self.folder = Path(folder)
        entries = [(name, tuple(shape), code_of(dtype)) for name, shape, dtype in entries]
        self.shards = plan_shards(entries, parse_size(max_shard_size))
        count = len(self.shards)
        self.files = (
            [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [(shard_index, entry) for shard_index, shard in enumerate(self.shards) for entry in shard]
        self._position = 0
        self._handle = None
        self._shard = -1
        self.total_bytes = 0

    def _open_shard(self, index: int) -> None:
        if self._handle:
            self._handle.close()
        header, offset = {}, 0
        for name, shape, dtype in self.shards[index]:
            nbytes = math.prod(shape) * SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
        self._handle = open(self.folder / self.files[index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)
        self._shard = index

    def write(self, name: str, tensor) -> None:
        """Write the next planned tensor (a torch tensor)."""
        _, (planned, shape, dtype) = self._order[self._position]
        if name != planned or tuple(tensor.shape) != tuple(shape) or code_of(tensor.dtype) != dtype:
            raise RuntimeError(f"writer expected {planned} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: list) -> None:
        """Write the next planned tensor from ordered parts: torch tensors of its dtype or numpy
        arrays of its stored form (`dtypes.STORAGE`), streamed through Python, and
        `(file, offset, nbytes)` spans of another file, copied by the kernel as `cp` does (or read
        and written where the kernel cannot copy between the two files), or a function returning
        one of those, called when its turn comes."""
        shard_index, (planned, shape, dtype) = self._order[self._position]
        expected = math.prod(shape) * SIZES[dtype]
        if name != planned:
            raise RuntimeError(f"writer expected {planned}, got {name}")
        if shard_index != self._shard:
            self._open_shard(shard_index)
        written = 0
        for part in parts:
            if callable(part):  # computed only now, after the parts before it are written
                part = part()
            if isinstance(part, tuple):
                written += self._copy_span(*part)
                continue
            if isinstance(part, np.ndarray):
                if part.dtype.itemsize != SIZES[dtype]:
                    raise RuntimeError(f"{name}: part of dtype {part.dtype}, planned {dtype}")
                data = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            else:  # a torch tensor, so torch is imported already
                import torch

                if code_of(part.dtype) != dtype:
                    raise RuntimeError(f"{name}: part of dtype {part.dtype}, planned {dtype}")
                data = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            self._handle.write(data)  # the array's buffer is written directly: no second copy
            written += data.nbytes
        if written != expected:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {expected}")
        self.total_bytes += written
        self._position += 1

    def _copy_span(self, source: Path, offset: int, nbytes: int) -> int:
        self._handle.flush()  # the kernel appends at the descriptor's position, after what is buffered
        copied = 0
        with open(source, "rb") as handle:
            while copied < nbytes:
                try:
                    count = os.copy_file_range(handle.fileno(), self._handle.fileno(), nbytes - copied, offset + copied)
                except OSError:
                    count = 0
                if count == 0:  # no in-kernel copy here: read and write the rest in 64 MiB blocks
                    handle.seek(offset + copied)
                    while copied < nbytes:
                        block = handle.read(min(1 << 26, nbytes - copied))
                        if not block:
                            raise OSError(f"{source}: ended {nbytes - copied} bytes early")
                        self._handle.write(block)
                        copied += len(block)
                    break
                copied += count
        return copied

    def close(self) -> None:
        if self._position != len(self._order):
            raise RuntimeError(f"writer closed after {self._position} of {len(self._order)} tensors")
        if self._handle:
            self._handle.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, entry in self._order for name in [entry[0]]}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_state_dict(folder: Path, state: dict, max_shard_size="5GB") -> list[str]:
    """Save an in-memory state dict as (sharded) safetensors; returns the files written."""
    entries = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    writer = ShardedWriter(folder, entries, max_shard_size)
    for name, tensor in state.items():
        writer.write(name, tensor)
    writer.close()
    return writer.files
