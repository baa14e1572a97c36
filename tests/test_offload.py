"""Measurements on models too big for memory: layer-offloaded loading gives the same figures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qwenforge import compare
from qwenforge.checkpoint.offload import is_offloaded, load_causal_lm
from qwenforge.convert import convert


def _norms(folder):
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return {name: tensor for name, tensor in tensors.items() if name.endswith("_norm.weight") and "self_attn" in name}


def test_offloaded_model_computes_the_same_logits(tiny_qwen2, monkeypatch):
    ids = torch.arange(1000, 1040).unsqueeze(0)
    in_memory = load_causal_lm(tiny_qwen2)
    monkeypatch.setenv("QWENFORGE_MAX_MEMORY", "1KiB")
    offloaded = load_causal_lm(tiny_qwen2)
    assert not is_offloaded(in_memory) and is_offloaded(offloaded)
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # nothing resident
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, in_memory(ids).logits)


def test_calibration_and_fidelity_in_bounded_memory_match(tmp_path, tiny_qwen2, monkeypatch):
    options = dict(qk_norm="calibrated", calibration_tokens=128, fidelity_tokens=128, accept_lossy=True, formats="fp16,q8_0")  # a random tiny model is "broken" by design
    free = convert(tiny_qwen2, tmp_path / "free", **options)["metadata"]
    monkeypatch.setenv("QWENFORGE_MAX_MEMORY", "1KiB")
    bounded = convert(tiny_qwen2, tmp_path / "bounded", **options)["metadata"]
    free_norms, bounded_norms = _norms(tmp_path / "free"), _norms(tmp_path / "bounded")
    assert free_norms.keys() == bounded_norms.keys() and len(free_norms) == 2 * 2  # q and k, two layers
    for name, tensor in free_norms.items():
        torch.testing.assert_close(bounded_norms[name], tensor)
    assert bounded["fidelity"]["kl"] == pytest.approx(free["fidelity"]["kl"], rel=1e-4, abs=1e-7)
    assert bounded["fidelity"]["top1_agreement"] == free["fidelity"]["top1_agreement"]
    assert bounded["smoke_test"]["reply"] == free["smoke_test"]["reply"]
    for name in ("fp16", "q8_0"):  # offloaded layers are measured in each format too
        assert bounded["fidelity"]["formats"][name]["top1"] == free["fidelity"]["formats"][name]["top1"]
        assert bounded["fidelity"]["formats"][name]["kl"] == pytest.approx(free["fidelity"]["formats"][name]["kl"], rel=1e-4, abs=1e-7)
    model, _ = compare.load(tmp_path / "bounded")
    assert is_offloaded(model)


def test_bad_max_memory_is_one_line(tiny_qwen2, tmp_path):
    import subprocess
    import sys

    text = tmp_path / "t.txt"
    text.write_text("Hello there.")
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "compare", str(tiny_qwen2), str(tiny_qwen2), "--text", str(text), "--max-memory", "lots"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --max-memory lots: not a size; give e.g. 16GiB or 500MB"
