"""Training backends with one interface: `create_backend("pytorch" | "mlx")`."""

from __future__ import annotations

from qwenforge.errors import QwenforgeError


def create_backend(name: str):
    """The backend object for a config's `backend` field."""
    if name == "pytorch":
        from qwenforge.train.backends.pytorch import PyTorchBackend

        return PyTorchBackend()
    if name == "mlx":
        from qwenforge.train.backends.mlx import MlxBackend

        return MlxBackend()
    raise QwenforgeError(f"backend {name!r}: choose pytorch or mlx")
