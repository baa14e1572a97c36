"""Shared by the real-model llama.cpp tests: an exported GGUF's greedy next token against its HF checkpoint's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qwenforge.files import default_text

HELDOUT_TOKENS = 256
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="llama.cpp engine not installed (pip install 'qwenforge[xllamacpp]')")


def hf_argmax(folder) -> tuple[list[int], list[int]]:
    """(held-out token ids, the HF checkpoint's greedy next token after each prefix)."""
    from qwenforge.export.llama_cpp import hf_greedy

    return hf_greedy(folder, default_text("heldout.txt").read_text(), HELDOUT_TOKENS)


def llama_cpp_agreement(folder: Path, reference, gguf: Path, export_type: str, ask: bool = False) -> float:
    """Export `folder` to `gguf`, run it in llama.cpp (asking the test question if `ask`), return top-1 agreement."""
    from qwenforge.export.llama_cpp import exported_agreement

    result = exported_agreement(folder, reference, gguf, export_type, threads=2, question="What is the capital of France?" if ask else None)
    if ask:
        assert "Paris" in result["reply"], result["reply"]
    print(f"{Path(folder).name} {export_type}: llama.cpp top-1 agreement with the HF checkpoint over {len(reference[1])} tokens: {result['top1']:.1%}")
    return result["top1"]


def source_agreement(source: Path, export_type: str, run_dir: Path) -> float:
    """The source's llama.cpp agreement in `export_type`, measured once per test run: test_export_real
    asserts it, test_convert_real holds the conversion to it (whichever runs first measures, under a lock)."""
    from qwenforge.cache import building

    record = run_dir / f"source-llama-cpp-{export_type}.json"
    with building(run_dir, record.name):
        if not record.exists():
            record.write_text(json.dumps(llama_cpp_agreement(source, hf_argmax(source), run_dir / f"source-{export_type}.gguf", export_type)))
    return json.loads(record.read_text())
