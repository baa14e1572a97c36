"""GGUF import: the embedded real model becomes an HF folder that stock transformers loads and chats with."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwenforge.cache import embedded_gguf
from qwenforge.checkpoint.gguf_import import gguf_metadata, import_gguf
from qwenforge.errors import QwenforgeError

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.mark.slow
def test_embedded_model_imports_and_answers(embedded_model_dir):
    assert EXPECTED_FILES <= {p.name for p in embedded_model_dir.iterdir()}
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["num_hidden_layers"] == 24 and config["hidden_size"] == 896 and config["vocab_size"] == 151_936
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_gguf_metadata_of_embedded_model():
    config = gguf_metadata(embedded_gguf())["config"]
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24 and config["hidden_size"] == 896
    assert config["num_attention_heads"] == 14 and config["num_key_value_heads"] == 2


def test_embedded_gguf_is_assembled_once_and_verified(tmp_path, monkeypatch):
    from qwenforge import cache

    path = embedded_gguf()
    assert path.stat().st_size == cache.EMBEDDED_GGUF_BYTES
    assert embedded_gguf() == path  # reused, not rebuilt
    monkeypatch.setattr(cache, "EMBEDDED_GGUF_SHA256", "0" * 64)
    with pytest.raises(QwenforgeError, match="reinstall"):
        embedded_gguf(tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []  # nothing half-written is left


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(QwenforgeError, match="not a GGUF file"):
        gguf_metadata(bad)


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(embedded_gguf(), "rb") as source:
        bad.write_bytes(source.read(5000))
    with pytest.raises(QwenforgeError, match="corrupt or truncated"):
        gguf_metadata(bad)


def test_missing_gguf_and_existing_output(tmp_path):
    with pytest.raises(QwenforgeError, match="no such GGUF file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(QwenforgeError, match="--force"):
        import_gguf(embedded_gguf(), tmp_path / "out")
