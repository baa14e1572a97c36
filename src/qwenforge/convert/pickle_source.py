"""Reading a pickle (`*.bin`) source, only when the user passes --allow-pickle.

Pickle files can run code when loaded; `weights_only=True` refuses anything but tensors, and
`mmap=True` keeps a shard on disk until a tensor is read. Same interface as `TensorReader`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenforge.checkpoint.dtypes import STORAGE, code_of
from qwenforge.checkpoint.safetensors_io import TensorInfo, shard_names
from qwenforge.errors import QwenforgeError

PICKLE_INDEX = "pytorch_model.bin.index.json"


def has_only_pickle(folder: Path) -> bool:
    folder = Path(folder)
    return not list(folder.glob("*.safetensors")) and bool(list(folder.glob("*.bin")))


class PickleReader:
    """Lazy-ish access to `pytorch_model*.bin` shards (memory-mapped, tensors only)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / PICKLE_INDEX
        if index.exists():
            files = sorted({self.folder / name for name in shard_names(index)})
        else:
            files = sorted(self.folder.glob("*.bin"))
        import torch

        self._states: dict[Path, dict] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.exists():
                raise QwenforgeError(f"{file}: shard listed in {PICKLE_INDEX} is missing; download it again")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # noqa: BLE001 - any unpickling failure is the user's file
                raise QwenforgeError(f"{file}: not a readable tensors-only pickle ({error}); re-export as safetensors") from error
            self._states[file] = state
            for name, tensor in state.items():
                self.tensors[name] = TensorInfo(name, tuple(tensor.shape), code_of(tensor.dtype), file)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str):
        info = self.tensors.get(name)
        if info is None:
            raise QwenforgeError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        return self._states[info.file][name]

    def array(self, name: str) -> np.ndarray:
        """The tensor's stored values as numpy (bfloat16 as uint16 bits), as `MappedReader.array`."""
        import torch

        tensor = self.get(name).contiguous()
        return tensor.reshape(-1).view(torch.uint8).numpy().view(STORAGE[self.tensors[name].dtype]).reshape(tensor.shape)

    def rows(self, name: str, ids: list[int]) -> np.ndarray:
        return self.array(name)[ids]


def open_source(folder: Path, allow_pickle: bool):
    """A reader for the source weights: safetensors, or pickle shards when allowed."""
    if has_only_pickle(folder):
        if not allow_pickle:
            raise QwenforgeError(
                f"{folder}: pickle weights (*.bin) can run code when loaded; pass --allow-pickle to read them "
                "(tensors only), or convert them to safetensors first"
            )
        return PickleReader(folder)
    from qwenforge.checkpoint.mapped_reader import MappedReader

    return MappedReader(folder)
