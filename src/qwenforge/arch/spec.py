"""A config.json normalized into the facts every stage needs, with exact parameter counts.

Counts are computed from the config alone (no weights), and a test proves them equal to stock
transformers' models instantiated on the meta device for every preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qwenforge.errors import QwenforgeError

FAMILIES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS  # every linear module of a decoder layer (the LoRA targets)

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}

REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelSpec:
    """Normalized architecture of a dense Qwen-family (or Llama-shaped) causal LM."""

    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    embedding_rows: int
    tied_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    use_sliding_window: bool
    sliding_window: int | None
    max_window_layers: int | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rms_norm_eps: float
    hidden_act: str

    @property
    def architecture(self) -> str:
        return FAMILIES[self.family]

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_theta(config: dict) -> float:
    # transformers 5 moved rope settings into `rope_parameters`; older configs keep `rope_theta`.
    rope = config.get("rope_parameters") or {}
    return float(config.get("rope_theta", rope.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict) -> dict | None:
    scaling = config.get("rope_scaling")
    if scaling:
        return dict(scaling)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        return {k: v for k, v in rope.items() if k != "rope_theta"}
    return None


def family_of(config: dict, source: str = "config") -> str:
    """The family of a config: from model_type, else from its architectures list."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in config.get("architectures") or []:
        for family, name in FAMILIES.items():
            if arch == name:
                return family
    supported = ", ".join(sorted(FAMILIES))
    raise QwenforgeError(
        f"{source}: unsupported architecture (model_type={model_type!r}); qwenforge handles dense {supported} models"
    )


def spec_from_config(config: dict, source: str = "config") -> ModelSpec:
    """Normalize a config.json dict; `source` names the file in error messages."""
    if not isinstance(config, dict):
        raise QwenforgeError(f"{source}: expected a JSON object; is this a config.json?")
    family = family_of(config, source)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise QwenforgeError(
            f"{source}: config is missing {', '.join(missing)}; copy the complete config.json of the checkpoint"
        )
    for key in (*REQUIRED_KEYS, "num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise QwenforgeError(f"{source}: {key} must be a positive integer, got {value!r}; fix config.json")
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias = bool(config.get("attention_bias", False))
    use_sliding = bool(config.get("use_sliding_window", False))
    return ModelSpec(
        family=family,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        intermediate=int(config["intermediate_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        embedding_rows=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(config),
        rope_scaling=_rope_scaling(config),
        max_positions=int(config.get("max_position_embeddings", 0)),
        use_sliding_window=use_sliding,
        sliding_window=config.get("sliding_window"),
        max_window_layers=config.get("max_window_layers"),
        # Qwen2 always has q/k/v biases and no o_proj bias; Qwen3 and Llama put one switch on all four.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)) if family == "llama" else False,
        qk_norm=family == "qwen3",
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        hidden_act=str(config.get("hidden_act", "silu")),
    )


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    """Exact parameter counts per component, as stock transformers allocates them."""
    q_out = spec.heads * spec.head_dim
    kv_out = spec.kv_heads * spec.head_dim
    attention = spec.hidden * q_out + 2 * spec.hidden * kv_out + q_out * spec.hidden
    if spec.qkv_bias:
        attention += q_out + 2 * kv_out
    if spec.o_bias:
        attention += spec.hidden
    mlp = 3 * spec.hidden * spec.intermediate
    if spec.mlp_bias:
        mlp += 2 * spec.intermediate + spec.hidden
    norms = 2 * spec.hidden + (2 * spec.head_dim if spec.qk_norm else 0)
    embeddings = spec.embedding_rows * spec.hidden
    head = 0 if spec.tied_embeddings else spec.embedding_rows * spec.hidden
    counts = {
        "embeddings": embeddings,
        "attention": attention * spec.layers,
        "mlp": mlp * spec.layers,
        "norms": norms * spec.layers + spec.hidden,
        "head": head,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - embeddings - head
    return counts


def weight_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of the weights at common precisions (int formats ignore quantization constants)."""
    total = parameter_counts(spec)["total"]
    return {name: int(total * size) for name, size in BYTES_PER_PARAM.items()}


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear module of one layer, with GQA KV width and the real head_dim."""
    q_width, kv_width = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    return {
        "q_proj": (spec.hidden, q_width),
        "k_proj": (spec.hidden, kv_width),
        "v_proj": (spec.hidden, kv_width),
        "o_proj": (q_width, spec.hidden),
        "gate_proj": (spec.hidden, spec.intermediate),
        "up_proj": (spec.hidden, spec.intermediate),
        "down_proj": (spec.intermediate, spec.hidden),
    }


def layer_ranges(text: str) -> list[int]:
    """'0,2,4-7' or '0-19,60-79' -> the layer indices, in order (ValueError when malformed: the caller names its flag)."""
    chosen: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if dash and not last:
            raise ValueError(f"an open range {part!r}")
        chosen += range(int(first), int(last or first) + 1)
    return chosen
