"""Turn what a user typed as MODEL into a config or a checkpoint folder: the one resolver behind every verb.

MODEL is a preset name, a checkpoint folder, a config.json, a .gguf file, 'embedded', or a Hugging Face
id (`Qwen/Qwen3-8B`, with a revision) read through huggingface_hub's cache; `spec` and `plan` fetch
only its config.json.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from qwenforge.arch.presets import get_preset, preset_names
from qwenforge.errors import QwenforgeError


def model_folder(model: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The checkpoint folder MODEL names: 'embedded', a local folder with config.json, or a hub id (downloaded once, then cached)."""
    from qwenforge.cache import EMBEDDED, embedded_model
    from qwenforge.checkpoint.hub import hub_download, is_hub_id

    if model == EMBEDDED:
        return embedded_model()
    if is_hub_id(model):
        return hub_download(model, revision=revision, cache_dir=cache_dir)
    folder = Path(model).expanduser()
    if not folder.exists():
        raise QwenforgeError(f"{model}: no such file or folder; give a checkpoint folder, adapter folder, .gguf file, a Hugging Face id (Org/Name) or 'embedded'")
    if not (folder / "config.json").exists():
        raise QwenforgeError(f"{folder}: no config.json or adapter_config.json; is this a checkpoint or PEFT adapter folder?")
    return folder


def load_model_config(model: str, revision: str | None = None, cache_dir: str | Path | None = None) -> tuple[dict, str]:
    """(config dict, label naming where it came from) for any MODEL argument; a hub id costs one config.json."""
    from qwenforge.cache import EMBEDDED, embedded_model
    from qwenforge.checkpoint.folder import read_config, read_json
    from qwenforge.checkpoint.hub import hub_download, is_hub_id

    if model == EMBEDDED:
        folder = embedded_model()
        return read_config(folder), str(folder / "config.json")
    if model in preset_names():
        return get_preset(model), f"preset {model}"
    if is_hub_id(model):
        try:
            path = hub_download(model, "config.json", revision=revision, cache_dir=cache_dir)
        except QwenforgeError:
            name = model.split("/", 1)[1]
            if name not in preset_names() or revision:
                raise
            return get_preset(name), f"preset {name} ({model} is not in the Hugging Face cache)"
        return read_json(path), f"{model} ({path})"
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
