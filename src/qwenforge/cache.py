"""Where qwenforge keeps what it builds once and reuses: imported models, tokenizer fixtures."""

from __future__ import annotations

import os
from pathlib import Path

from qwenforge.checkpoint.gguf_import import EMBEDDED_MODEL_NAME, embedded_gguf, import_gguf

EMBEDDED = "embedded"


def cache_root() -> Path:
    """$QWENFORGE_CACHE, else ~/.cache/qwenforge (read per call so tests can redirect it)."""
    return Path(os.environ.get("QWENFORGE_CACHE") or Path.home() / ".cache" / "qwenforge")


def embedded_model(root: Path | None = None) -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct as an HF folder: imported from its GGUF once, then reused.

    Dequantized to float32: the GGUF's block-quantized values (fp16 scale x small integer) are exact
    in float32, while bfloat16 would round them and make "the source" differ from the published model.
    """
    root = root or cache_root()
    folder = root / "models" / EMBEDDED_MODEL_NAME
    if not (folder / "config.json").exists():
        import_gguf(embedded_gguf(root), folder, force=True)
    return folder
