"""q_norm / k_norm weights for a model trained without them: from a donor, calibrated on text, or ones.

Qwen3 divides every query and key head vector by its own RMS before RoPE; no weight undoes that
exactly. `calibrated` runs the source on text and picks, per layer and per head dimension, the
weight w_d minimising sum (w_d * n_d - q_d)^2 over tokens and heads, where q is the source's
projection (bias included) and n the converted model's normalised projection: the least-squares
closest the norm can get to the source's activations. Calibration runs the source once; a source
too big for memory runs layer-offloaded (checkpoint/offload.py), so memory stays bounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when calibrating: a plain conversion never needs it
    import torch

QK_NORM_METHODS = ("donor", "calibrated", "ones")


def calibrate(
    source, text: str, keep_bias: bool, max_tokens: int = 1024, window: int = 512, biases: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """{output tensor name: weight} for every layer's q_norm and k_norm, fitted on `text`.

    `source` is the source folder or a loaded (model, tokenizer) pair. `biases` (source tensor
    name -> q/k projection bias, read from the checkpoint) replaces the modules' own, which an
    offloaded model has already put back on the meta device when a forward hook runs.
    """
    import torch

    from qwenforge.compare import load

    model, tokenizer = load(source)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name: str, bias_name: str):
        def accumulate(module, inputs, output):
            bias = module.bias if biases is None else biases.get(bias_name)
            target = output.detach().float().reshape(-1, head_dim)
            converted = target  # what the converted model normalises: the projection without a dropped bias
            if bias is not None and not keep_bias:
                converted = (output.detach().float() - bias.float()).reshape(-1, head_dim)
            normed = converted * torch.rsqrt(converted.pow(2).mean(-1, keepdim=True) + eps)
            numerator = (target * normed).sum(0)
            denominator = normed.pow(2).sum(0)
            if name in sums:
                sums[name][0] += numerator
                sums[name][1] += denominator
            else:
                sums[name] = [numerator, denominator]

        return accumulate

    handles = []
    for index, layer in enumerate(model.model.layers):
        for kind in ("q", "k"):
            projection = getattr(layer.self_attn, f"{kind}_proj")
            name = f"model.layers.{index}.self_attn.{kind}_norm.weight"
            handles.append(projection.register_forward_hook(hook(name, f"model.layers.{index}.self_attn.{kind}_proj.bias")))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:max_tokens]
    with torch.no_grad():
        for start in range(0, len(ids), window):
            model(ids[start : start + window].unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {name: numerator / denominator.clamp_min(1e-12) for name, (numerator, denominator) in sums.items()}


FLOAT16_SMALLEST_NORMAL = 6.103515625e-05


def fragile_qk_reason(folder) -> str | None:
    """Why a checkpoint's q/k projections cannot survive float16 or training (else None).

    `heal --method linearize` scales them to ~1e-7: every such weight is below float16's smallest
    normal number (it flushes to zero or keeps a few bits) and one optimizer step is larger than the
    weight. Reads the first layer's q_proj/k_proj only (linearize scales every layer alike), from
    the safetensors headers and those two tensors; no model load. Shared by train, distill, chat/serve
    (fp16 choice) and export.
    """
    from pathlib import Path

    import numpy as np

    from qwenforge.checkpoint.dtypes import to_float32
    from qwenforge.checkpoint.mapped_reader import MappedReader

    folder = Path(folder)
    if not (folder / "config.json").exists() or not list(folder.glob("*.safetensors")):
        return None
    reader = MappedReader(folder)
    largest = {}
    for kind in ("q", "k"):
        name = f"model.layers.0.self_attn.{kind}_proj.weight"
        if name not in reader.tensors:
            return None
        largest[kind] = float(np.abs(to_float32(reader.array(name), reader.tensors[name].dtype)).max())
    if max(largest.values()) >= FLOAT16_SMALLEST_NORMAL:
        return None
    return (
        f"{folder}: q/k projection weights are at most {max(largest.values()):.2g} (a linearized heal), below float16's smallest normal "
        f"number: they underflow in float16 and break under training; heal it with --method anchor (or global) first, or run it in bfloat16/float32"
    )
