"""qwenforge: know, convert, heal, teach and run dense Qwen-family checkpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qwenforge")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
