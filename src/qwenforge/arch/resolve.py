"""Turn what a user typed as MODEL (preset, folder, config.json, GGUF file, 'embedded') into a config."""

from __future__ import annotations

import difflib
from pathlib import Path

from qwenforge.arch.presets import get_preset, preset_names
from qwenforge.errors import QwenforgeError


def load_model_config(model: str) -> tuple[dict, str]:
    """(config dict, label naming where it came from) for any MODEL argument."""
    from qwenforge.cache import EMBEDDED, embedded_model
    from qwenforge.checkpoint.folder import read_config, read_json

    if model == EMBEDDED:
        folder = embedded_model()
        return read_config(folder), str(folder / "config.json")
    if model in preset_names():
        return get_preset(model), f"preset {model}"
    path = Path(model)
    if path.is_dir():
        return read_config(path), str(path / "config.json")
    if path.suffix == ".json" and path.exists():
        return read_json(path), str(path)
    if path.suffix == ".gguf":
        from qwenforge.checkpoint.gguf_import import gguf_metadata

        return gguf_metadata(path)["config"], str(path)
    if path.exists():
        raise QwenforgeError(f"{path}: not a checkpoint folder, config.json or .gguf file")
    close = closest_presets(model)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `qwenforge spec --list` shows the presets"
    raise QwenforgeError(f"{model}: no such file, folder or preset{hint}")


def closest_presets(text: str) -> list[str]:
    """Up to three preset names a typo most likely meant: case-insensitive prefix matches first."""
    names = preset_names()
    lowered = {name.lower(): name for name in names}
    prefix = [name for name in names if name.lower().startswith(text.lower())]
    fuzzy = [lowered[m] for m in difflib.get_close_matches(text.lower(), list(lowered), n=3, cutoff=0.4)]
    return list(dict.fromkeys(prefix + fuzzy))[:3]
