"""The exported real Qwen2.5 run in llama.cpp itself: it loads, answers through its chat template, and
its greedy next token agrees with the Hugging Face checkpoint's over held-out text.

Slow (real 0.5B model; per type: the export, then ~255 one-token llama.cpp steps); skipped only
when llama.cpp's engine (the `xllamacpp` extra) is not installed.
"""

from __future__ import annotations

import importlib.resources
import importlib.util

import pytest

from qwenforge.export.gguf import export

HELDOUT_TOKENS = 256
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="llama.cpp engine not installed (pip install 'qwenforge[xllamacpp]')"),
]


@pytest.fixture(scope="module")
def reference(embedded_model_dir):
    """(held-out token ids, the HF checkpoint's argmax next token after each prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = importlib.resources.files("qwenforge").joinpath("data/heldout.txt").read_text()
    ids = AutoTokenizer.from_pretrained(str(embedded_model_dir))(text)["input_ids"][:HELDOUT_TOKENS]
    model = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir), dtype=torch.float32)
    with torch.no_grad():
        predicted = model(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
    del model
    return ids, predicted


def agreement_in_llama_cpp(embedded_model_dir, reference, tmp_path, export_type: str, ask: bool = False) -> float:
    from qwenforge.export.llama_cpp import chat_reply, greedy_next_tokens, llama_cpp_server

    out = tmp_path / f"qwen2.5-coder-0.5b-{export_type}.gguf"
    export(embedded_model_dir, out, export_type)
    ids, predicted = reference
    with llama_cpp_server(out, context=HELDOUT_TOKENS + 64) as server:
        if ask:
            reply = chat_reply(server, "What is the capital of France?")
            assert "Paris" in reply, reply
        chosen = greedy_next_tokens(server, ids)
    agreement = sum(a == b for a, b in zip(chosen, predicted)) / len(predicted)
    print(f"{export_type}: llama.cpp top-1 agreement with the HF checkpoint over {len(predicted)} held-out tokens: {agreement:.1%}")
    return agreement


def test_f16_loads_answers_and_agrees(embedded_model_dir, reference, tmp_path):
    assert agreement_in_llama_cpp(embedded_model_dir, reference, tmp_path, "f16", ask=True) >= 0.99


def test_q8_0_agrees(embedded_model_dir, reference, tmp_path):
    assert agreement_in_llama_cpp(embedded_model_dir, reference, tmp_path, "q8_0") >= 0.97


def test_q4_k_m_agrees(embedded_model_dir, reference, tmp_path):
    # The embedded model is itself a published Q4_K_M mix dequantized: re-quantizing with the same rules
    # recovers most blocks, so the bar is a floor, the figure is printed.
    assert agreement_in_llama_cpp(embedded_model_dir, reference, tmp_path, "q4_k_m") >= 0.85
