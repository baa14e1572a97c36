"""A PEFT adapter folder merged into its base on the way to export (peft's merge_and_unload).

The merge holds the base model in float32 in memory (4 bytes per parameter: 2 GB for 0.5B,
30 GB for 7B) and writes one merged copy to a temporary folder beside the output, removed after.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from qwenforge.checkpoint.folder import copy_tokenizer_files, read_json
from qwenforge.errors import QwenforgeError


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file() and not (Path(folder) / "config.json").is_file()


def base_of(adapter: Path, base: Path | None) -> Path:
    """The base model folder: --base, else the adapter's base_model_name_or_path when it is a local folder."""
    if base is None:
        named = read_json(Path(adapter) / "adapter_config.json").get("base_model_name_or_path")
        if not named or not (Path(named) / "config.json").is_file():
            raise QwenforgeError(
                f"{adapter}: its base model {named!r} is not a local checkpoint folder; pass --base BASE_FOLDER"
            )
        base = Path(named)
    if not (Path(base) / "config.json").is_file():
        raise QwenforgeError(f"{base}: no config.json; --base must be the adapter's base checkpoint folder")
    return Path(base)


@contextlib.contextmanager
def merged_adapter(adapter: Path, base: Path, workdir: Path) -> Iterator[Path]:
    """Yield a temporary checkpoint folder holding base + adapter merged; removed afterwards."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    temp = Path(workdir) / f".tmp-merge-{uuid.uuid4().hex[:8]}"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(temp, safe_serialization=True)
        del model
        copy_tokenizer_files(base, temp)
        copy_tokenizer_files(adapter, temp)  # an adapter's own tokenizer files (added tokens) win
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)
