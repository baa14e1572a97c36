"""Load a checkpoint for measurement (calibration, fidelity) in bounded memory.

A model whose float32 weights do not fit its share of the memory (a 72B source beside its
conversion on an ordinary machine) is loaded through transformers' big-model path instead:
`device_map="auto"` with a CPU cap, so accelerate keeps the layers beyond the cap in their
safetensors files and reads each one on every forward pass. Same figures, bounded memory,
slower. `max_memory` (`--max-memory`, e.g. `16GiB`) sets the cap per model by hand;
$QWENFORGE_MAX_MEMORY is the user's default for it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from qwenforge.arch.spec import parameter_counts, spec_from_config
from qwenforge.checkpoint.folder import read_config
from qwenforge.checkpoint.safetensors_io import parse_memory

SHARE = 0.4  # of the available memory, per model: measurements hold two models (source and conversion)


def memory_cap(max_memory: str | int | None = None) -> int:
    """Bytes one loaded model may take: `max_memory`, else $QWENFORGE_MAX_MEMORY (the user's default), else a share of the available memory."""
    from qwenforge.devices import available_memory

    if max_memory is not None:
        return parse_memory(max_memory)
    if os.environ.get("QWENFORGE_MAX_MEMORY"):
        return parse_memory(os.environ["QWENFORGE_MAX_MEMORY"])
    return int(available_memory("cpu") * SHARE)


def load_causal_lm(folder: Path, max_memory: str | int | None = None):
    """The model of `folder` in float32 on the CPU, evaluation mode: in memory when it fits the cap,
    else layer-offloaded (transformers reads offloaded layers from the original safetensors files
    and casts them as they run: no float32 copy is written)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    needed = parameter_counts(spec_from_config(read_config(folder), str(folder / "config.json")))["total"] * 4
    cap = memory_cap(max_memory)
    if needed <= cap:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    offload = tempfile.TemporaryDirectory(prefix="qwenforge-offload-")
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "some parameters are on the meta device": that is the point
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, device_map="auto", max_memory={"cpu": cap}, offload_folder=offload.name
        ).eval()
    finally:
        quiet.setLevel(level)
    model._qwenforge_offload = offload  # lives as long as the model
    return model


def is_offloaded(model) -> bool:
    return "disk" in set((getattr(model, "hf_device_map", None) or {}).values())
