"""Parameter counts from the config must equal stock transformers' models, for every preset."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qwenforge.arch.presets import get_preset, preset_names
from qwenforge.arch.spec import parameter_counts, spec_from_config, weight_bytes
from qwenforge.errors import QwenforgeError
from qwenforge.fixtures.tiny import TINY_KINDS, tiny_config


def stock_parameter_count(config_dict: dict) -> int:
    config = dict(config_dict)
    model_type = config.pop("model_type")
    config.pop("transformers_version", None)
    hf_config = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    # Tied heads share one tensor; parameters() counts it once, as qwenforge does.
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_equal_stock_transformers(name):
    config = get_preset(name)
    assert parameter_counts(spec_from_config(config))["total"] == stock_parameter_count(config)


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_tiny_counts_equal_stock_transformers(kind):
    config = tiny_config(kind)
    assert parameter_counts(spec_from_config(config))["total"] == stock_parameter_count(config)


def test_llama_with_biases_counts_exactly():
    config = tiny_config("llama", attention_bias=True, mlp_bias=True)
    assert parameter_counts(spec_from_config(config))["total"] == stock_parameter_count(config)


def test_qwen25_72b_known_facts():
    spec = spec_from_config(get_preset("Qwen2.5-72B-Instruct"))
    counts = parameter_counts(spec)
    assert (spec.layers, spec.hidden, spec.kv_heads, spec.head_dim) == (80, 8192, 8, 128)
    assert spec.qkv_bias and not spec.o_bias and not spec.qk_norm and not spec.tied_embeddings
    assert counts["embeddings"] == counts["head"] == 152064 * 8192
    assert counts["non_embedding"] == counts["total"] - 2 * 152064 * 8192
    assert 72.6e9 < counts["total"] < 72.8e9
    assert weight_bytes(spec)["bf16"] == 2 * counts["total"]


def test_qwen3_head_dim_is_not_hidden_over_heads():
    spec = spec_from_config(get_preset("Qwen3-0.6B"))
    assert spec.head_dim == 128 and spec.hidden // spec.heads == 64
    assert spec.qk_norm and spec.tied_embeddings and parameter_counts(spec)["head"] == 0


def test_hybrid_preset_is_qwen3_with_qwen25_widths():
    hybrid = spec_from_config(get_preset("Qwen3-72B-Instruct"))
    source = spec_from_config(get_preset("Qwen2.5-72B-Instruct"))
    assert hybrid.family == "qwen3" and hybrid.qk_norm and not hybrid.qkv_bias
    assert (hybrid.layers, hybrid.hidden, hybrid.intermediate) == (source.layers, source.hidden, source.intermediate)
    assert hybrid.embedding_rows == 151936


def test_rope_parameters_of_transformers5_configs_are_read():
    config = tiny_config("qwen3")
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0}
    spec = spec_from_config(config)
    assert spec.rope_theta == 5e6 and spec.rope_scaling == {"rope_type": "yarn", "factor": 4.0}


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "mamba", "hidden_size": 1}, "unsupported architecture"),
        ({"model_type": "qwen2", "hidden_size": 64}, "missing intermediate_size"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_configs_get_one_clear_line(config, message):
    with pytest.raises(QwenforgeError, match=message):
        spec_from_config(config, "x/config.json")
