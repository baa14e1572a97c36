"""The exported real Qwen2.5 run in llama.cpp itself: it loads, answers through its chat template, and
its greedy next token agrees with the Hugging Face checkpoint's over held-out text.

Slow (real 0.5B model; per type: the export, then ~255 one-token llama.cpp steps); skipped only
when llama.cpp's engine (the `xllamacpp` extra) is not installed. Q8_0 is checked on the Qwen3
conversion of this model (test_convert_real), through the same exporter and quantizer.
"""

from __future__ import annotations

import pytest
from llama_cpp_agreement import hf_argmax, llama_cpp_agreement, needs_llama_cpp, source_agreement

pytestmark = [pytest.mark.slow, needs_llama_cpp]


@pytest.fixture(scope="module")
def reference(embedded_model_dir):
    return hf_argmax(embedded_model_dir)


def test_f16_loads_answers_and_agrees(embedded_model_dir, reference, tmp_path):
    assert llama_cpp_agreement(embedded_model_dir, reference, tmp_path / "source-f16.gguf", "f16", ask=True) >= 0.99


def test_q4_k_m_agrees(embedded_model_dir, run_dir):
    # The embedded model is itself a published Q4_K_M mix dequantized: re-quantizing with the same rules
    # recovers most blocks, so the bar is a floor, the figure is printed.
    assert source_agreement(embedded_model_dir, "q4_k_m", run_dir) >= 0.85
