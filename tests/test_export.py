"""`qwenforge export`: GGUF writing (names, types, metadata), round trips through import-gguf, refusals, Modelfile."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from qwenforge.checkpoint.folder import read_config
from qwenforge.checkpoint.gguf_import import import_gguf
from qwenforge.checkpoint.mapped_reader import MappedReader
from qwenforge.checkpoint.safetensors_io import TensorReader
from qwenforge.errors import QwenforgeError
from qwenforge.export import llama_quant
from qwenforge.export.gguf import export, export_plan, tensor_type
from qwenforge.export.ollama import modelfile_for

HAS_ENGINE = importlib.util.find_spec("xllamacpp") is not None
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason="llama.cpp engine not installed (pip install 'qwenforge[xllamacpp]')")


def edited_copy(source: Path, target: Path, edit, **config_changes) -> Path:
    """A copy of a tiny checkpoint with its tensors changed by `edit(state)` and its config updated."""
    shutil.copytree(source, target)
    state = {}
    for file in target.glob("*.safetensors"):
        state |= load_file(file)
        file.unlink()
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    config = read_config(target) | config_changes
    (target / "config.json").write_text(json.dumps(config))
    return target


def assert_same_tensors(expected: Path, actual: Path) -> None:
    left, right = TensorReader(expected), TensorReader(actual)
    assert sorted(left.names()) == sorted(right.names())
    for name in left.names():
        assert torch.equal(left.get(name).float(), right.get(name).float()), name


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip} | {
        "_tensors": {tensor.name: tensor.tensor_type for tensor in reader.tensors},
        "_token_types": reader.fields["tokenizer.ggml.token_type"].contents(),
        "_tokens": reader.fields["tokenizer.ggml.tokens"].contents(),
    }


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])  # Qwen3: the f16 round trip below
def test_round_trip_f32_is_tensor_identical(fixture, request, tmp_path):
    """import -> export -> import: every tensor bit-identical (llama's q/k rope permutation undone on import)."""
    source = request.getfixturevalue(fixture)
    info = export(source, tmp_path / "model.gguf", "f32")
    assert set(info["types"]) == {"F32"} and info["skipped"] == {}
    back = import_gguf(tmp_path / "model.gguf", tmp_path / "back")
    assert_same_tensors(source, back)
    assert read_config(back)["architectures"] == read_config(source)["architectures"]


def test_cli_import_gguf_writes_a_checkpoint_in_the_asked_dtype(tiny_qwen3, tmp_path):
    from typer.testing import CliRunner

    from qwenforge.cli import app

    export(tiny_qwen3, tmp_path / "model.gguf", "f32")
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import-gguf", str(tmp_path / "model.gguf"), str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    reader = TensorReader(out)
    assert {str(reader.get(name).dtype) for name in reader.names()} == {"torch.bfloat16"}
    refused = CliRunner().invoke(app, ["import-gguf", str(tmp_path / "model.gguf"), str(tmp_path / "other"), "--dtype", "int8"])
    assert refused.exit_code != 0 and "--dtype int8: choose float32, bfloat16 or float16" in str(refused.exception)
    assert not (tmp_path / "other").exists()


def test_round_trip_f16_of_f16_exact_source(tiny_qwen3, tmp_path):
    def to_half_values(state):
        for name, tensor in state.items():
            state[name] = tensor.half().float()

    source = edited_copy(tiny_qwen3, tmp_path / "exact", to_half_values)
    info = export(source, tmp_path / "model.gguf", "f16")
    assert info["types"] == {"F16": 15, "F32": 9}  # matrices F16, norms F32 (as llama.cpp's converter)
    assert_same_tensors(source, import_gguf(tmp_path / "model.gguf", tmp_path / "back"))


def test_metadata_is_what_llama_cpp_reads(tiny_qwen3, tmp_path):
    export(tiny_qwen3, tmp_path / "q3.gguf", "q8_0")
    fields = gguf_fields(tmp_path / "q3.gguf")
    config = read_config(tiny_qwen3)
    assert fields["general.architecture"] == "qwen3"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for key, value in {
        "qwen3.block_count": config["num_hidden_layers"],
        "qwen3.context_length": config["max_position_embeddings"],
        "qwen3.embedding_length": config["hidden_size"],
        "qwen3.feed_forward_length": config["intermediate_size"],
        "qwen3.attention.head_count": config["num_attention_heads"],
        "qwen3.attention.head_count_kv": config["num_key_value_heads"],
        "qwen3.attention.key_length": config["head_dim"],  # 32, not hidden/heads = 16
        "qwen3.attention.value_length": config["head_dim"],
    }.items():
        assert fields[key] == value, key
    assert fields["qwen3.rope.freq_base"] == pytest.approx(1_000_000.0)
    assert fields["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["_tokens"]) == config["vocab_size"] == 151936
    assert fields["_tokens"][151668] == "</think>" and fields["_tokens"][151669] == "[PAD151669]"
    assert fields["_token_types"][151645] == gguf.TokenType.CONTROL  # <|im_end|>
    assert fields["_token_types"][151669] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.eos_token_id"] == 151645 and fields["tokenizer.ggml.add_bos_token"] is False
    assert "enable_thinking" in fields["tokenizer.chat_template"]
    assert fields["qwenforge.source"] == str(tiny_qwen3.resolve()) and fields["qwenforge.type"] == "q8_0"
    tensors = fields["_tensors"]
    assert tensors["blk.0.attn_q_norm.weight"] == Q.F32 and tensors["blk.1.attn_q.weight"] == Q.Q8_0
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_yarn_rope_scaling_written(tiny_qwen3, tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    source = edited_copy(tiny_qwen3, tmp_path / "yarn", lambda state: None, rope_parameters=rope)
    export(source, tmp_path / "yarn.gguf", "f16")
    fields = gguf_fields(tmp_path / "yarn.gguf")
    assert fields["qwen3.rope.scaling.type"] == "yarn" and fields["qwen3.rope.scaling.factor"] == 4.0
    assert fields["qwen3.rope.scaling.original_context_length"] == 32768


def test_tensor_types_follow_llama_cpp():
    # q4_k_m: output and every attn_v/ffn_down that llama.cpp's use_more_bits picks get Q6_K.
    assert tensor_type("output.weight", (151936, 1024), "q4_k_m", 24, tied=False) == Q.Q6_K
    assert tensor_type("token_embd.weight", (151936, 1024), "q4_k_m", 24, tied=True) == Q.Q6_K
    assert tensor_type("token_embd.weight", (151936, 1024), "q4_k_m", 24, tied=False) == Q.Q4_K
    assert tensor_type("blk.0.attn_v.weight", (128, 1024), "q4_k_m", 24, tied=False) == Q.Q6_K
    assert tensor_type("blk.4.attn_v.weight", (128, 1024), "q4_k_m", 24, tied=False) == Q.Q4_K
    assert tensor_type("blk.5.ffn_down.weight", (1024, 4864), "q4_k_m", 24, tied=False) == Q.Q6_K
    # rows of 896 (Qwen2.5-0.5B) are not a multiple of 256: llama.cpp's fallbacks
    assert tensor_type("blk.4.attn_q.weight", (896, 896), "q4_k_m", 24, tied=False) == Q.Q5_0
    assert tensor_type("output.weight", (151936, 896), "q4_k_m", 24, tied=False) == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0", 2, tied=False) == Q.F16  # 48 not a multiple of 32
    assert tensor_type("blk.0.attn_q.bias", (64,), "q8_0", 2, tied=False) == Q.F32
    assert tensor_type("output.weight", (151936, 64), "q4_0", 2, tied=False) == Q.Q8_0


def keep_bias(state, o_bias: float = 0.0):
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        for part in ("q", "k", "v"):
            rows = state[prefix + f"{part}_proj.weight"].shape[0]
            state[prefix + f"{part}_proj.bias"] = torch.randn(rows) * 0.1
        state[prefix + "o_proj.bias"] = torch.full((state[prefix + "o_proj.weight"].shape[0],), o_bias)


def test_zero_o_proj_bias_left_out_and_nonzero_refused(tiny_qwen3, tmp_path):
    source = edited_copy(tiny_qwen3, tmp_path / "kept", keep_bias, attention_bias=True)
    plans, skipped = export_plan(MappedReader(source), read_config(source), "f16")
    assert sorted(skipped) == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)]
    targets = {plan.target for plan in plans}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= targets
    assert not any("attn_output.bias" in target for target in targets)
    bad = edited_copy(tiny_qwen3, tmp_path / "bad", lambda state: keep_bias(state, 0.5), attention_bias=True)
    with pytest.raises(QwenforgeError, match="o_proj.bias is not zero"):
        export(bad, tmp_path / "bad.gguf", "f16")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*.part")) == []


@needs_engine
def test_keep_bias_qwen3_loads_in_llama_cpp(tiny_qwen3, tmp_path):
    """The bug report: llama.cpp refused a --keep-bias Qwen3 ('wrong number of tensors') for its zero o_proj bias."""
    from qwenforge.export.llama_cpp import greedy_next_tokens, llama_cpp_server

    source = edited_copy(tiny_qwen3, tmp_path / "kept", keep_bias, attention_bias=True)
    export(source, tmp_path / "kept.gguf", "f32")
    with llama_cpp_server(tmp_path / "kept.gguf", context=64) as server:
        assert len(greedy_next_tokens(server, [9707, 11, 1879])) == 2


def test_linearized_checkpoint_refused_for_half_formats(tiny_qwen2, tmp_path):
    def linearize(state):
        for name in state:
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                state[name] = state[name] * 3e-7  # what heal --method linearize leaves (DESIGN.md)

    source = edited_copy(tiny_qwen2, tmp_path / "linear", linearize)
    for export_type in ("f16", "q8_0"):
        with pytest.raises(QwenforgeError, match=r"[qk]_proj.weight has max \|w\| .*underflows.*--type f32 or bf16"):
            export(source, tmp_path / f"linear-{export_type}.gguf", export_type)
    assert not list(tmp_path.glob("linear-*"))
    export_plan(MappedReader(source), read_config(source), "bf16")  # bfloat16 keeps float32's exponent range: accepted


def test_existing_output_refused_without_force(tiny_qwen3, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(QwenforgeError, match="already exists.*--force"):
        export(tiny_qwen3, out, "f16")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(QwenforgeError, match=r"\*\.gguf"):
        export(tiny_qwen3, tmp_path / "m.bin", "f16")
    with pytest.raises(QwenforgeError, match="--type q3: choose one of"):
        export(tiny_qwen3, tmp_path / "n.gguf", "q3")


def test_k_quants_refused_in_one_line_without_the_engine(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_quant, "ENGINE", "no_such_llama_cpp_engine")
    llama_quant._quantize_chunk.cache_clear()
    try:
        with pytest.raises(QwenforgeError, match=r"need llama.cpp's quantizer: pip install 'qwenforge\[xllamacpp\]'"):
            export(tiny_qwen3, tmp_path / "k.gguf", "q4_k_m")
    finally:
        llama_quant._quantize_chunk.cache_clear()
    assert not (tmp_path / "k.gguf").exists()


@needs_engine
def test_llama_cpp_k_quantizer_round_trips(tmp_path):
    values = np.random.default_rng(0).normal(0, 0.05, (8, 512)).astype(np.float32)
    for qtype in (Q.Q4_K, Q.Q6_K):
        packed = llama_quant.quantize_rows(values, qtype, gguf.quants.quant_shape_to_byte_shape(values.shape, qtype)[-1])
        back = gguf.quants.dequantize(packed, qtype)
        error = np.abs(back - values).mean() / np.abs(values).mean()
        assert error < (0.08 if qtype == Q.Q4_K else 0.03), (qtype.name, error)


def test_adapter_merged_on_the_way(tiny_qwen2, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(QwenforgeError, match="--base"):
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "Qwen/not-here"}))
        export(tmp_path / "adapter", tmp_path / "a.gguf", "f32")
    info = export(tmp_path / "adapter", tmp_path / "a.gguf", "f32", base=tiny_qwen2)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    written = np.asarray(tensors["blk.1.attn_q.weight"].data)
    assert np.array_equal(written, expected.numpy()) and not np.array_equal(written, TensorReader(tiny_qwen2).get("model.layers.1.self_attn.q_proj.weight").numpy())
    assert "merged into" in gguf_fields(tmp_path / "a.gguf")["qwenforge.source"] and info["tensors"] > 0
    assert not list(tmp_path.glob(".tmp-merge-*"))


def test_modelfile_for_qwen3_and_qwen25(tiny_qwen3, tiny_qwen2, tmp_path):
    qwen3 = modelfile_for(tiny_qwen3, "q3.gguf")
    assert qwen3.startswith("FROM ./q3.gguf\n")
    assert "{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}" in qwen3  # enable_thinking=False
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in qwen3
    assert 'PARAMETER stop "<|im_end|>"' in qwen3 and 'PARAMETER stop "<|im_start|>"' in qwen3
    assert "SYSTEM" not in qwen3  # Qwen3's template has no default system prompt
    sampled = edited_copy(tiny_qwen2, tmp_path / "sampled", lambda state: None)
    generation = json.loads((sampled / "generation_config.json").read_text())
    generation |= {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (sampled / "generation_config.json").write_text(json.dumps(generation))
    qwen25 = modelfile_for(sampled, "q25.gguf")
    assert 'SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."' in qwen25
    assert "<think>" not in qwen25
    for line in ("PARAMETER temperature 0.7", "PARAMETER top_p 0.8", "PARAMETER top_k 20", "PARAMETER repeat_penalty 1.05"):
        assert line in qwen25


def test_cli_export_prints_the_ollama_line(tiny_qwen3, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "qwenforge.cli", *args], capture_output=True, text=True, timeout=600)

    result = run("export", str(tiny_qwen3), str(tmp_path / "tiny-q3.gguf"), "--type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert f"ollama create tiny-q3 -f {tmp_path / 'tiny-q3.Modelfile'}" in result.stdout
    assert (tmp_path / "tiny-q3.gguf").is_file() and (tmp_path / "tiny-q3.Modelfile").is_file()
    again = run("export", str(tiny_qwen3), str(tmp_path / "tiny-q3.gguf"))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
