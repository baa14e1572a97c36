"""The demo on the real Qwen2.5-Coder-0.5B-Instruct (q/k/v biases, untied head), then its conversion
and heal examined: slow, real model on the CPU.

`qwenforge demo --quick` (the README's first command) runs once per test run, here; its Qwen3
conversion and its default heal are the material of the tests below, so the suite converts the
real model once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from llama_cpp_agreement import hf_argmax, llama_cpp_agreement, needs_llama_cpp, source_agreement

from qwenforge import compare
from qwenforge.files import default_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory, embedded_model_dir):
    """(workdir, stdout) of `qwenforge demo --quick`, run as a user runs it (a subprocess, its exit code)."""
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    result = subprocess.run([sys.executable, "-m", "qwenforge.cli", "demo", "--quick", "--workdir", str(workdir)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_demo_runs_end_to_end(demo):
    _, stdout = demo
    assert "qwenforge spec" in stdout and "done" in stdout
    # the real model answers, keeps its answer through convert + heal, and answers over HTTP; every stage is timed
    assert "same answer as the source" in stdout, stdout[-3000:]
    assert "/v1/chat/completions -> " in stdout and "Paris" in stdout.split("/v1/chat/completions -> ")[1]
    assert "time per stage" in stdout and "total" in stdout


@pytest.fixture(scope="module")
def converted(demo):
    """The demo's conversion: the real Qwen3 tokenizer, biases kept, q/k-norm calibrated on 256 tokens (lossy until healed)."""
    return demo[0] / "converted-qwen3"


def test_real_qwen25_converts_with_biases_and_calibrated_qk_norm(converted, embedded_model_dir):
    out = converted
    record = json.loads((out / "conversion_metadata.json").read_text())
    # the Qwen3 tokenizer adds <tool_response>, </tool_response>, <think>, </think>; the rows stay 151,936
    assert record["vocabulary"]["new"] == 4 and record["vocabulary"]["rows"] == 151_936
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 24
    assert record["smoke_test"]["loaded_with"] == "Qwen3ForCausalLM" and record["smoke_test"]["reply"]
    fidelity = record["fidelity"]
    assert fidelity["same_tokenization"]
    # the q/k-norm costs something (measured: about 25% top-1 at 512 tokens), but far from the 0% of dropped biases
    assert fidelity["candidate"]["bits_per_byte"] > fidelity["reference"]["bits_per_byte"]
    assert 0.1 < fidelity["top1_agreement"] < 1.0
    assert f"{fidelity['candidate']['bits_per_byte']:.4f}" in (out / "README.md").read_text()

    # calibration beats weights of one on the same text
    model, tokenizer = compare.load(out)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    ones = compare.fidelity(embedded_model_dir, (model, tokenizer), default_text("heldout.txt").read_text(), max_tokens=128)
    assert fidelity["kl"] < ones["kl"]


@pytest.fixture(scope="module")
def healed(demo):
    """(folder, heal report) of the demo's default heal (anchor: closed form, every weight in fp16's range)."""
    folder = demo[0] / "healed"
    return folder, json.loads((folder / "heal_report.json").read_text())


def test_real_qwen25_healed_is_faithful_in_each_format(healed):
    """The default heal restores the source on held-out text (the demo checks that the test question keeps
    its answer), in float32 and in each format the demo measures, beside the source in the same format."""
    _, report = healed
    assert "anchored" in report
    assert report["before"]["top1_agreement"] < 0.8
    assert report["after"]["top1_agreement"] >= 0.9
    assert report["after"]["bits_per_byte"] <= 1.03 * report["after"]["teacher_bits_per_byte"]
    assert set(report["formats"]) == {"bf16", "fp16", "q8_0"}
    for name, row in report["formats"].items():
        assert row["top1"] >= 0.9 and row["bits_per_byte_ratio"] <= 1.03, (name, row)


@needs_llama_cpp
def test_real_conversion_exported_runs_in_llama_cpp(healed, embedded_model_dir, tmp_path, run_dir):
    """The Qwen3 conversion of the real model, exported, loads in llama.cpp, answers through its chat
    template, and takes the HF checkpoint's greedy next token over held-out text: f16 >= 99%, Q8_0 >= 97%,
    Q4_K_M no worse than the source exported the same way (within 2 points)."""
    target, _ = healed
    reference = hf_argmax(target)
    assert llama_cpp_agreement(target, reference, tmp_path / "healed-f16.gguf", "f16", ask=True) >= 0.99
    assert llama_cpp_agreement(target, reference, tmp_path / "healed-q8_0.gguf", "q8_0") >= 0.97
    converted_q4 = llama_cpp_agreement(target, reference, tmp_path / "healed-q4_k_m.gguf", "q4_k_m")
    assert converted_q4 >= source_agreement(embedded_model_dir, "q4_k_m", run_dir) - 0.02
