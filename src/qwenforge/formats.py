"""A model put in a format it will be run in: bf16/fp16 on GPUs, GGUF Q8_0/Q4_0/Q4_K_M in llama.cpp.

Emulated on the CPU, where 16-bit matmuls are ~20x slower than float32: every weight is rounded to
the format and every module's output is rounded to the activation dtype, while arithmetic stays in
float32 (GPU tensor cores also accumulate in float32). A q/k weight below float16's range becomes 0
here as it does there; an activation above it becomes inf. GGUF types quantize each weight to the
type the exporter gives it (export/gguf.tensor_type: llama.cpp's rules, e.g. Q4_K_M keeps the
output and some attn_v/ffn_down layers at Q6_K and falls back to Q5_0 where rows are not a multiple
of 256) and back, with gguf-py's block code, and llama.cpp's own quantizer for K-quants (the
`xllamacpp` extra); norms and biases stay F32, activations float32 as llama.cpp's CPU path keeps
them between its 8-bit dot products.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch

from qwenforge.errors import QwenforgeError

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_FORMATS = ("q8_0", "q4_0", "q4_k_m")  # export --type names
FORMATS = (*FLOAT_FORMATS, *GGUF_FORMATS)
DEFAULT_FORMATS = ("bf16", "fp16", "q8_0")


def parse_formats(text: str | None) -> tuple[list[str], bool]:
    """(formats, lora requested) from `bf16,fp16,q8_0,lora`; q4_k_m needs llama.cpp's quantizer (checked now)."""
    names = [n.strip().lower() for n in (text or ",".join(DEFAULT_FORMATS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS and n != "lora"]
    if unknown:
        raise QwenforgeError(f"--formats {','.join(unknown)}: choose from {', '.join(FORMATS)}, lora")
    if "q4_k_m" in names:
        from qwenforge.export.llama_quant import engine_available

        if not engine_available():
            raise QwenforgeError("--formats q4_k_m needs llama.cpp's quantizer: pip install 'qwenforge[xllamacpp]' (or measure q4_0)")
    return [n for n in dict.fromkeys(names) if n != "lora"], "lora" in names


def gguf_round_trip(weight: torch.Tensor, qtype) -> torch.Tensor:
    """`weight` (2-D) quantized to `qtype` (a GGMLQuantizationType, or an export type name) and back."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from qwenforge.export.gguf import EXPORT_TYPES, encode

    qtype = EXPORT_TYPES[qtype][1] if isinstance(qtype, str) else qtype
    if qtype == GGMLQuantizationType.F32:
        return weight
    array = weight.detach().float().numpy()
    return torch.from_numpy(dequantize(encode(array, qtype), qtype).reshape(array.shape).astype("float32"))


def gguf_types(model, name: str) -> dict[str, object]:
    """{parameter name: GGMLQuantizationType} that `export --type name` would give each weight of `model`."""
    import gguf

    from qwenforge.export.gguf import ARCHITECTURES, tensor_type

    config = model.config
    if config.model_type not in ARCHITECTURES:
        raise QwenforgeError(f"--formats {name}: model_type {config.model_type!r} has no GGUF layout; qwenforge exports {', '.join(ARCHITECTURES)}")
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(ARCHITECTURES[config.model_type], layers)
    types = {}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):
        target = names.get_name(parameter_name, try_suffixes=(".weight", ".bias"))
        if target is not None:
            types[parameter_name] = tensor_type(target, tuple(parameter.shape), name, layers, bool(config.tie_word_embeddings))
    return types


def put(tensor: torch.Tensor, name: str, qtype=None) -> torch.Tensor:
    """One parameter in format `name`: float formats round every float tensor; a GGUF format
    quantizes a weight to `qtype` (its type in that format, see gguf_types) and keeps the rest."""
    if name in FLOAT_FORMATS:
        return tensor.to(FLOAT_FORMATS[name]).float() if tensor.is_floating_point() else tensor
    return tensor if qtype is None else gguf_round_trip(tensor, qtype)


def _round_outputs(dtype: torch.dtype):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.to(dtype).float()
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].is_floating_point():
            return (output[0].to(dtype).float(), *output[1:])
        return output

    return hook


class _FormattedWeights(Mapping):
    """An offloaded module's weights map (accelerate reads each weight from it as the module runs), read in the format."""

    def __init__(self, weights: Mapping, parameters: dict, name: str):
        self.weights, self.parameters, self.name = weights, parameters, name  # parameters: {name: GGUF type or None}

    def __getitem__(self, key):
        value = self.weights[key]
        return put(value, self.name, self.parameters[key]) if key in self.parameters else value

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def _swap(parameters: dict, name: str, types: dict):
    """Hooks that put a module's own parameters in the format while it runs, and restore them after."""
    kept = {}

    def before(module, inputs):
        for key, parameter in parameters.items():
            kept[key] = parameter.data
            parameter.data = put(parameter.data, name, types.get(key))

    def after(module, inputs, output):
        for key, parameter in parameters.items():
            parameter.data = kept.pop(key)

    return before, after


@contextmanager
def formatted(model, name: str):
    """`model` computing in format `name` inside the block (see the module docstring).

    Each module's own parameters are put in the format as it runs and restored after it, so the
    extra memory is one module's weights, not a second model (a measurement already holds two); a
    layer offloaded to disk (checkpoint/offload.py) is read through the format by accelerate's hook.
    """
    if name not in FORMATS:  # a misspelt name would otherwise measure float32 under another label
        raise QwenforgeError(f"format {name}: choose one of {', '.join(FORMATS)}")
    handles, maps = [], []
    qtypes = gguf_types(model, name) if name in GGUF_FORMATS else {}
    try:
        for prefix, module in model.named_modules() if name != "fp32" else ():
            parameters = dict(module.named_parameters(recurse=False))
            types = {key: qtypes.get(f"{prefix}.{key}" if prefix else key) for key in parameters}
            hook = getattr(module, "_hf_hook", None)
            if parameters and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                maps.append((hook, hook.weights_map))
                hook.weights_map = _FormattedWeights(hook.weights_map, types, name)
            elif parameters:
                before, after = _swap(parameters, name, types)
                handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            if name in FLOAT_FORMATS:
                handles.append(module.register_forward_hook(_round_outputs(FLOAT_FORMATS[name])))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for hook, weights in maps:
            hook.weights_map = weights
