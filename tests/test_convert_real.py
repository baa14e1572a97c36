"""convert on the real SmolLM2-135M-Instruct (Llama-shaped source): completes and reports its fidelity."""

from __future__ import annotations

import json

import pytest
import torch

from qwenforge import compare
from qwenforge.convert import convert
from qwenforge.convert.run import default_text


@pytest.mark.slow
def test_smollm2_converts_with_calibrated_qk_norm(tmp_path, embedded_model_dir):
    out = tmp_path / "smollm2-qwen3"
    result = convert(embedded_model_dir, out, qk_norm="calibrated", fidelity_tokens=128, calibration_tokens=256)
    record = json.loads((out / "conversion_metadata.json").read_text())
    assert record["vocabulary"]["new"] == 0 and record["vocabulary"]["rows"] == 49_152
    assert record["smoke_test"]["loaded_with"] == "Qwen3ForCausalLM" and record["smoke_test"]["reply"]
    fidelity = record["fidelity"]
    assert fidelity["same_tokenization"]
    # the q/k-norm graft costs something, but a calibrated model still mostly agrees with its source
    assert fidelity["candidate"]["bits_per_byte"] > fidelity["reference"]["bits_per_byte"]
    assert 0.25 < fidelity["top1_agreement"] < 1.0
    assert f"{fidelity['candidate']['bits_per_byte']:.4f}" in (out / "README.md").read_text()
    assert result["metadata"]["fidelity"]["kl"] == pytest.approx(fidelity["kl"])

    # calibration beats weights of one on the same text
    model, tokenizer = compare.load(out)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    ones = compare.fidelity(embedded_model_dir, (model, tokenizer), default_text("heldout.txt").read_text(), max_tokens=128)
    assert fidelity["kl"] < ones["kl"]
    assert fidelity["top1_agreement"] > ones["top1_agreement"]
