"""The tensor map of a conversion: every output tensor, where it comes from and what is done to it.

Built from tensor headers and configs only (nothing loaded), printed by `--dry-run`, checked by
the tests, then executed by `run.py`. Like transformers' modular Qwen3, it states only what
differs from Qwen2: q/k-norm added, biases dropped or kept (o_proj gets a zero one), vocabulary
rows re-indexed; every other tensor is "copy".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qwenforge.arch.spec import ModelSpec
from qwenforge.checkpoint.dtypes import NAMES
from qwenforge.checkpoint.safetensors_io import TensorInfo
from qwenforge.errors import QwenforgeError

ATTENTION = "model.layers.{}.self_attn.{}"


@dataclass(frozen=True)
class Step:
    """One output tensor: `op` is copy | transplant-rows | donor | calibrated | ones | zeros."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name ("BF16"); shown as "bfloat16"
    op: str
    source: str | None
    detail: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["dtype"] = NAMES[self.dtype]
        return data


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2/Llama checkpoint of this spec must hold, with its shape."""
    q_out, kv_out = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (spec.embedding_rows, spec.hidden), "model.norm.weight": (spec.hidden,)}
    if not spec.tied_embeddings:
        shapes["lm_head.weight"] = (spec.embedding_rows, spec.hidden)
    for i in range(spec.layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (spec.hidden,)
        shapes[layer + "post_attention_layernorm.weight"] = (spec.hidden,)
        for kind, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            shapes[layer + f"self_attn.{kind}_proj.weight"] = (out, spec.hidden)
            if spec.qkv_bias:
                shapes[layer + f"self_attn.{kind}_proj.bias"] = (out,)
        shapes[layer + "self_attn.o_proj.weight"] = (spec.hidden, q_out)
        if spec.o_bias:
            shapes[layer + "self_attn.o_proj.bias"] = (spec.hidden,)
        shapes[layer + "mlp.gate_proj.weight"] = (spec.intermediate, spec.hidden)
        shapes[layer + "mlp.up_proj.weight"] = (spec.intermediate, spec.hidden)
        shapes[layer + "mlp.down_proj.weight"] = (spec.hidden, spec.intermediate)
    return shapes


def check_tensors(tensors: dict[str, TensorInfo], spec: ModelSpec, folder) -> list[str]:
    """Raise for a missing or misshapen tensor; return the names the conversion ignores (with reasons)."""
    expected = expected_shapes(spec)
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise QwenforgeError(f"{folder}: tensor {name} is missing; the checkpoint is incomplete or not a {spec.family} model")
        if tuple(info.shape) != shape:
            raise QwenforgeError(
                f"{info.file}: tensor {name} has shape {list(info.shape)} but config.json implies {list(shape)}; "
                "the weights and config.json do not belong together"
            )
    ignored = []
    for name in tensors:
        if name in expected:
            continue
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and spec.tied_embeddings):
            ignored.append(name)  # derived from config / tied to the embeddings: not a weight of its own
        else:
            raise QwenforgeError(f"{folder}: unexpected tensor {name} for a {spec.family} checkpoint; qwenforge converts dense Qwen2/Llama models")
    return ignored


def donor_layer_map(source_layers: int, donor_layers: int) -> list[int]:
    """Donor layer for each source layer, at the same relative depth (first to first, last to last)."""
    if source_layers == 1:
        return [0]
    return [round(index * (donor_layers - 1) / (source_layers - 1)) for index in range(source_layers)]


def build_tensor_map(
    tensors: dict[str, TensorInfo],
    spec: ModelSpec,
    rows: int,
    keep_bias: bool,
    qk_norm: str,
    new_token_init: str,
    vocab_changed: bool,
    folder=".",
    donor_layers: int | None = None,
) -> dict:
    """{"steps": [Step...] in output order, "dropped": [{name, reason}...]}; validates shapes first.

    A donor of another depth gives its q/k-norm by relative depth (`donor_layer_map`).
    """
    ignored = check_tensors(tensors, spec, folder)
    steps: list[Step] = []
    dropped = [{"name": name, "reason": "derived or tied, not stored in Qwen3"} for name in ignored]
    expected = expected_shapes(spec)
    attention_bias = keep_bias and (spec.qkv_bias or spec.o_bias)
    for name in tensors:  # source order keeps reads sequential
        if name not in expected:
            continue
        info = tensors[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            op = "transplant-rows" if vocab_changed else "copy"
            detail = f"rows re-indexed by token string to {rows}; new tokens: {new_token_init}; padding: mean of sampled real rows" if vocab_changed else ""
            steps.append(Step(name, (rows, spec.hidden), info.dtype, op, name, detail))
            continue
        if name.endswith("_proj.bias") and "self_attn" in name and not attention_bias:
            dropped.append({"name": name, "reason": "q/k/v bias dropped (--drop-bias); without it the bias is kept exactly"})
            continue
        steps.append(Step(name, tuple(info.shape), info.dtype, "copy", name))
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("self_attn.k_proj.weight"):
            norm_dtype = tensors[f"model.layers.{layer}.input_layernorm.weight"].dtype
            for kind in ("q", "k"):
                target = ATTENTION.format(layer, f"{kind}_norm.weight")
                donor_layer = donor_layer_map(spec.layers, donor_layers or spec.layers)[int(layer)]
                source = f"donor:{ATTENTION.format(donor_layer, f'{kind}_norm.weight')}" if qk_norm == "donor" else None
                detail = {
                    "donor": "copied from the donor's same layer" if donor_layer == int(layer) else f"copied from the donor's layer {donor_layer} (same relative depth)",
                    "calibrated": "least-squares fit to the source's per-dimension projections on the calibration text",
                    "ones": "all ones",
                }[qk_norm]
                steps.append(Step(target, (spec.head_dim,), norm_dtype, qk_norm, source, detail))
        if name.endswith("self_attn.o_proj.weight") and attention_bias and not spec.o_bias:
            steps.append(
                Step(ATTENTION.format(layer, "o_proj.bias"), (spec.hidden,), info.dtype, "zeros", None, "attention_bias=True also gives o_proj a bias; zero keeps outputs exact")
            )
    return {"steps": steps, "dropped": dropped}


def format_tensor_map(tensor_map: dict) -> str:
    """One line per output tensor (the `--dry-run` listing)."""
    width = max((len(step.name) for step in tensor_map["steps"]), default=10)
    lines = []
    for step in tensor_map["steps"]:
        origin = step.source if step.source and step.source != step.name else ("(source)" if step.source else "(new)")
        lines.append(f"{step.name:<{width}}  {str(list(step.shape)):<14} {NAMES[step.dtype]:<9} {step.op:<15} {origin}  {step.detail}".rstrip())
    for drop in tensor_map["dropped"]:
        lines.append(f"{drop['name']:<{width}}  dropped: {drop['reason']}")
    return "\n".join(lines)
