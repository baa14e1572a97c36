"""`qwenforge train merge RUN OUT`: the trained run as one plain checkpoint folder.

The base model gets each topic's adapter merged in the order the run used them: every topic's
adapter in turn for `between_topics: merge`, the last topic's adapter for `continue` (it already
holds the earlier topics' training). Needs memory for one copy of the model in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwenforge import __version__
from qwenforge.checkpoint.folder import atomic_output, copy_tokenizer_files, refuse_overlap, write_json
from qwenforge.errors import QwenforgeError


def adapters_to_merge(run: Path) -> tuple[dict, list[Path]]:
    """(recipe, adapter folders in merge order) of a run folder; finished topics only."""
    run = Path(run)
    recipe_path = run / "recipe.json"
    if not recipe_path.exists():
        raise QwenforgeError(f"{run}: no recipe.json; give the output folder of `qwenforge train`")
    recipe = json.loads(recipe_path.read_text())
    finished = [
        run / "topics" / f"{i + 1:02d}-{name}" / "adapter"
        for i, name in enumerate(recipe["topics"])
        if (run / "topics" / f"{i + 1:02d}-{name}" / "adapter" / "adapter_config.json").exists()
    ]
    if not finished:
        raise QwenforgeError(f"{run}: no finished topic yet; train (or --resume) until one topic completes")
    mode = recipe["config"]["between_topics"]
    return recipe, finished if mode == "merge" else finished[-1:]


def merge_run(run: Path, out: Path, force: bool = False, dtype: str = "float32") -> dict:
    """Write base + merged adapters as a safetensors checkpoint with tokenizer and recipe."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenforge.checkpoint.dtypes import weight_dtype

    weight_dtype(dtype)
    recipe, adapters = adapters_to_merge(run)
    base = Path(recipe["model_folder"])
    refuse_overlap(out, {"run": run, "base model": base})
    if not (base / "config.json").exists():
        raise QwenforgeError(f"{base}: the run's base model is gone; restore it to merge")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model = model.to(getattr(torch, dtype))
    with atomic_output(out, force=force) as temp:
        model.save_pretrained(temp, safe_serialization=True)
        copied = copy_tokenizer_files(base, temp)
        info = {
            "qwenforge_version": __version__,
            "command": "qwenforge train merge",
            "run": str(Path(run).resolve()),
            "base_model": str(base),
            "adapters": [str(a) for a in adapters],
            "dtype": dtype,
            "tokenizer_files": copied,
        }
        write_json(temp / "qwenforge-recipe.json", info)
    return {**info, "output": str(out)}
