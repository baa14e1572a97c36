"""compare: bits per byte, KL, top-1 agreement, perplexity and per-layer cosine, checked by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qwenforge import compare
from qwenforge.files import default_text

TEXT = "The river rose after three days of rain, and the ferry stopped running until the water went down. " * 3


@pytest.fixture(scope="module")
def tiny(tiny_qwen2):
    return compare.load(tiny_qwen2)


def test_identical_models_agree_completely(tiny):
    result = compare.fidelity(tiny, tiny, TEXT)
    assert result["same_tokenization"]
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["top1_agreement"] == 1.0
    assert result["bits_per_byte_ratio"] == pytest.approx(1.0)
    assert result["layer_cosine"] == pytest.approx([1.0] * 3, abs=1e-5)


def test_bits_per_byte_and_perplexity_by_hand(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    predicted_bytes = len(TEXT.encode()) - len(tokenizer.decode(ids[0, :1]).encode())
    result = compare.bits_per_byte(tiny, TEXT, window=4096)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / predicted_bytes, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (ids.shape[1] - 1)), rel=1e-5)
    windowed = compare.bits_per_byte(tiny, TEXT, window=16)  # every token still predicted once
    assert windowed["tokens"] == result["tokens"]


def test_a_perturbed_candidate_is_measured(tiny, tiny_qwen2):
    model, tokenizer = compare.load(tiny_qwen2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(40.0)
    result = compare.fidelity(tiny, (model, tokenizer), TEXT)
    assert result["kl"] > 1e-4
    assert result["top1_agreement"] < 1.0
    assert result["layer_cosine"][0] == pytest.approx(1.0, abs=1e-5)  # embeddings untouched
    assert result["layer_cosine"][2] < 0.999
    # KL by hand on the first window
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        p = torch.log_softmax(tiny[0](ids[:, :-1]).logits[0, :, :151_665], -1)
        q = torch.log_softmax(model(ids[:, :-1]).logits[0, :, :151_665], -1)
    assert result["kl"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-3)


def test_windows_batched_in_one_pass_equal_one_at_a_time(tiny, tiny_qwen2, monkeypatch):
    """Windows go through the models several at a time (an offloaded model then reads its weights
    once), the last right-padded; every figure equals the window-by-window measurement."""
    model, tokenizer = compare.load(tiny_qwen2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(40.0)
    calls = []
    original = compare._forward
    monkeypatch.setattr(compare, "_forward", lambda *args, **kwargs: calls.append(args[1].shape) or original(*args, **kwargs))
    batched = compare.fidelity(tiny, (model, tokenizer), TEXT, window=16)  # 3.x windows: one padded batch
    assert [shape[0] for shape in calls] == [4, 4]  # one pass per model
    batched_bits = compare.bits_per_byte(tiny, TEXT, window=16)["bits_per_byte"]
    monkeypatch.setattr(compare, "WINDOWS_PER_PASS", 1)
    single = compare.fidelity(tiny, (model, tokenizer), TEXT, window=16)
    for key in ("kl", "top1_agreement", "bits_per_byte_ratio"):
        assert batched[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7)
    assert batched["layer_cosine"] == pytest.approx(single["layer_cosine"], rel=1e-5)
    assert batched_bits == pytest.approx(compare.bits_per_byte(tiny, TEXT, window=16)["bits_per_byte"], rel=1e-5)


def test_cli_compare_json_and_plot(tmp_path, tiny_qwen2, tiny_llama):
    text = tmp_path / "text.txt"
    text.write_text(default_text("heldout.txt").read_text()[:600])
    plot = tmp_path / "layers.png"
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "compare", str(tiny_qwen2), str(tiny_llama), "--text", str(text), "--json", "--plot", str(plot)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["same_tokenization"] and len(data["layer_cosine"]) == 3
    assert data["reference"]["bits_per_byte"] > 0 and data["candidate"]["bits_per_byte"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_different_tokenizers_compare_bits_per_byte_only(tiny_other_vocab, embedded_model_dir):
    result = compare.fidelity(embedded_model_dir, tiny_other_vocab, default_text("heldout.txt").read_text(), max_tokens=96)
    assert not result["same_tokenization"]
    assert "kl" not in result and "top1_agreement" not in result
    # the real model predicts English far better than a random tiny one
    assert result["reference"]["bits_per_byte"] < 2.0 < result["candidate"]["bits_per_byte"]


def test_formats_across_a_transplant_compare_bits_per_byte(tiny, tiny_other_vocab):
    """Another tokenization has no position-wise top-1 or KL, so each format compares bits per byte, each
    model reading the text its own way, and the tables say so instead of failing."""
    other = compare.load(tiny_other_vocab)
    plain = compare.fidelity(tiny, other, TEXT)
    rows = compare.format_fidelity(tiny, other, TEXT, ["bf16", "q8_0"])
    for row in rows.values():
        assert row["top1"] is None and row["kl"] is None
        assert row["bits_per_byte_ratio"] == pytest.approx(row["bits_per_byte"] / row["source_bits_per_byte"])
        assert row["bits_per_byte"] == pytest.approx(plain["candidate"]["bits_per_byte"], rel=0.05)  # a format moves a model a little
    assert rows["q8_0"]["bits_per_byte"] != plain["candidate"]["bits_per_byte"]  # and the format was applied
    assert compare.fidelity(tiny, other, TEXT)["candidate"] == plain["candidate"]  # then taken off again
    assert "      -       -" in compare.formats_table(rows)


def test_gguf_blocks_follow_llama_cpp_rules_and_tiny_weights_vanish():
    """Q8_0: 32-value blocks, one float16 scale max|x|/127 each; a linearized weight (~1e-8) has a scale that
    float16 flushes to zero, so the whole block dequantizes to 0 (the issue's 5.1% top-1)."""
    from qwenforge.formats import gguf_round_trip

    weight = torch.randn(4, 64)
    restored = gguf_round_trip(weight, "q8_0")
    step = weight.view(-1, 32).abs().amax(-1, keepdim=True) / 127
    scale_rounding = weight.view(-1, 32).abs() * 2.0**-10  # the float16 scale's own rounding
    assert ((restored - weight).view(-1, 32).abs() <= step * 0.5 + scale_rounding + 1e-6).all()
    assert (gguf_round_trip(weight * 1e-8, "q8_0") == 0).all()
    assert (gguf_round_trip(weight, "q4_0") - weight).abs().mean() > (restored - weight).abs().mean()


def test_formats_parse_and_q4_k_m_needs_llama_cpps_quantizer(monkeypatch):
    from qwenforge.errors import QwenforgeError
    from qwenforge.export import llama_quant
    from qwenforge.formats import DEFAULT_FORMATS, parse_formats

    assert parse_formats(None) == (list(DEFAULT_FORMATS), False)
    assert parse_formats("bf16,q4_k_m,lora") == (["bf16", "q4_k_m"], True)
    with pytest.raises(QwenforgeError, match="--formats int3"):
        parse_formats("int3")
    monkeypatch.setattr(llama_quant, "engine_available", lambda: False)
    with pytest.raises(QwenforgeError, match=r"q4_k_m needs llama.cpp's quantizer: pip install 'qwenforge\[xllamacpp\]'"):
        parse_formats("q4_k_m")


def test_q4_k_m_gives_each_weight_the_exporters_type(tiny_qwen2):
    """The emulated Q4_K_M is the exported one: per-tensor types from export/gguf.tensor_type, K-quants by llama.cpp."""
    from gguf import GGMLQuantizationType as Q

    from qwenforge.export.gguf import tensor_type
    from qwenforge.formats import gguf_round_trip, gguf_types

    model, _ = compare.load(tiny_qwen2)
    types = gguf_types(model, "q4_k_m")
    layers, tied = model.config.num_hidden_layers, model.config.tie_word_embeddings
    assert types["model.layers.0.self_attn.q_proj.bias"] == Q.F32 and types["model.norm.weight"] == Q.F32
    v = model.model.layers[0].self_attn.v_proj.weight
    assert types["model.layers.0.self_attn.v_proj.weight"] == tensor_type("blk.0.attn_v.weight", tuple(v.shape), "q4_k_m", layers, tied)
    wide = torch.randn(4, 512)
    k4, k6 = gguf_round_trip(wide, Q.Q4_K), gguf_round_trip(wide, Q.Q6_K)
    assert 0 < (k6 - wide).abs().mean() < (k4 - wide).abs().mean() < 0.1 * wide.abs().mean()


def test_each_format_measures_both_models_in_it(tiny_llama, tmp_path):
    """A linearized model equals its source in float32 and falls apart in float16 and Q8_0, where the source holds."""
    from qwenforge.convert.run import convert
    from qwenforge.fixtures.tiny import build_tiny_checkpoint
    from qwenforge.formats import formatted, gguf_types, put
    from qwenforge.heal import linearize_qk_norms

    sharp = build_tiny_checkpoint("llama", tmp_path / "sharp", tiny_llama, initializer_range=0.2)
    convert(sharp, tmp_path / "converted", measure=False)
    source = compare.load(sharp)
    candidate = compare.load(tmp_path / "converted")
    linearize_qk_norms(candidate[0])
    text = default_text("heldout.txt").read_text()
    result = compare.format_fidelity(source, candidate, text, ["fp32", "fp16", "q8_0"], max_tokens=200)
    assert result["fp32"]["source_top1"] == 1.0 and result["fp32"]["top1"] > 0.97
    # a tiny random model's output barely depends on attention: Q8_0's flushed blocks still show in KL, and the weights show the rest
    assert result["q8_0"]["kl"] > 100 * result["fp32"]["kl"] and result["fp16"]["source_top1"] > 0.9, result
    weight = candidate[0].model.layers[0].self_attn.q_proj.weight
    original = weight.detach().clone()
    seen = {}

    def look(module, inputs, output):
        seen["fp16"] = module.weight.detach().clone()

    probe = candidate[0].model.layers[0].self_attn.q_proj.register_forward_hook(look)
    with torch.no_grad(), formatted(candidate[0], "fp16"):
        candidate[0](torch.arange(8).unsqueeze(0))
    probe.remove()
    assert torch.equal(seen["fp16"], original.half().float()) and not torch.equal(seen["fp16"], original)
    assert torch.equal(weight, original)  # restored after the block
    q8 = dict(name="q8_0", qtype=gguf_types(candidate[0], "q8_0")["model.layers.0.self_attn.q_proj.weight"])
    assert (put(original, **q8) == 0).float().mean() > (put(source[0].model.layers[0].self_attn.q_proj.weight.detach(), **q8) == 0).float().mean()
    table = compare.formats_table(result)
    assert table.count("\n") == 3 and "q8_0" in table


def test_lora_arm_is_the_same_run_for_both(tiny):
    arm = compare.lora_trainability(tiny, tiny, TEXT * 4, TEXT, steps=2, sequence_length=32)
    assert arm["source_before"] == pytest.approx(arm["candidate_before"])
    assert arm["source_after"] == pytest.approx(arm["candidate_after"], rel=1e-5) and arm["source_after"] != arm["source_before"]
    assert arm["ratio_after"] == pytest.approx(1.0, rel=1e-5)


def test_formats_of_an_offloaded_model_match_the_model_in_memory(tiny_qwen2, monkeypatch):
    """A model offloaded beyond --max-memory is measured in every format (its layers read through the format), with the same figures."""
    from qwenforge.checkpoint.offload import is_offloaded

    text = default_text("heldout.txt").read_text()
    formats = ["bf16", "fp16", "q8_0", "q4_k_m"]
    in_memory = compare.format_fidelity(tiny_qwen2, tiny_qwen2, text, formats, max_tokens=128)
    monkeypatch.setenv("QWENFORGE_MAX_MEMORY", "1KiB")
    offloaded = compare.load(tiny_qwen2)
    assert is_offloaded(offloaded[0])
    bounded = compare.format_fidelity(offloaded, tiny_qwen2, text, formats, max_tokens=128)
    for name in formats:
        assert bounded[name]["source_top1"] == pytest.approx(in_memory[name]["source_top1"]) and bounded[name]["top1"] == pytest.approx(in_memory[name]["top1"])
        assert bounded[name]["source_bits_per_byte"] == pytest.approx(in_memory[name]["source_bits_per_byte"], rel=1e-5)
    assert in_memory["q4_k_m"]["source_bits_per_byte"] != in_memory["bf16"]["source_bits_per_byte"]  # the formats differ
