"""The output config.json: the source's own facts written in Qwen3's vocabulary.

Everything the weights were trained with (widths, rope, norm eps, activation, sliding window,
tied or untied head) comes from the source; only the architecture, the vocabulary rows, the
token ids and `attention_bias` change. `tie_word_embeddings` is copied, never switched on.
"""

from __future__ import annotations

from qwenforge.arch.spec import ModelSpec


def rope_parameters(config: dict, spec: ModelSpec) -> dict:
    """transformers 5 `rope_parameters` (rope_theta inside) from either the new or the old config keys."""
    if config.get("rope_parameters"):
        return dict(config["rope_parameters"])
    rope = {"rope_type": "default"}
    if spec.rope_scaling:
        rope.update(spec.rope_scaling)
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    rope["rope_theta"] = spec.rope_theta
    return rope


def layer_types(config: dict, spec: ModelSpec) -> list[str]:
    """Per-layer attention kinds; Qwen2 and Qwen3 share the rule: sliding from max_window_layers on."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    first_sliding = spec.max_window_layers if spec.max_window_layers is not None else spec.layers
    return [
        "sliding_attention" if spec.use_sliding_window and spec.sliding_window and i >= first_sliding else "full_attention"
        for i in range(spec.layers)
    ]


def qwen3_config(
    source_config: dict, spec: ModelSpec, rows: int, attention_bias: bool, token_ids: dict[str, int | list | None]
) -> dict:
    """config.json of the converted model; `token_ids` holds bos/eos/pad ids in the target tokenizer."""
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": rows,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": spec.hidden_act,
        "max_position_embeddings": spec.max_positions,
        "initializer_range": source_config.get("initializer_range", 0.02),
        "rms_norm_eps": spec.rms_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": spec.tied_embeddings,
        "rope_parameters": rope_parameters(source_config, spec),
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": spec.use_sliding_window,
        "sliding_window": spec.sliding_window if spec.use_sliding_window else None,
        "max_window_layers": spec.max_window_layers if spec.max_window_layers is not None else spec.layers,
        "layer_types": layer_types(source_config, spec),
        "dtype": source_config.get("dtype") or source_config.get("torch_dtype") or "float32",
    }
    config.update(token_ids)
    return config


def config_diff(before: dict, after: dict) -> dict:
    """Machine-readable diff: keys added, removed and changed (with both values)."""
    ignore = {"transformers_version"}
    keys = (set(before) | set(after)) - ignore
    return {
        "added": {k: after[k] for k in sorted(keys) if k not in before},
        "removed": {k: before[k] for k in sorted(keys) if k not in after},
        "changed": {k: {"from": before[k], "to": after[k]} for k in sorted(keys) if k in before and k in after and before[k] != after[k]},
    }
