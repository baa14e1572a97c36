"""A model put in a format it will be run in: bf16/fp16 on GPUs, GGUF Q8_0/Q4_0 in llama.cpp.

Emulated on the CPU, where 16-bit matmuls are ~20x slower than float32: every weight is rounded to
the format and every module's output is rounded to the activation dtype, while arithmetic stays in
float32 (GPU tensor cores also accumulate in float32). A q/k weight below float16's range becomes 0
here as it does there; an activation above it becomes inf. GGUF types quantize every 2-D weight
whose rows split into 32-value blocks (linear layers and embeddings; llama.cpp keeps norms and
biases in F32) with the `gguf` package's reference implementation of llama.cpp's block rules,
round trip, activations in float32 as llama.cpp's CPU path keeps them. gguf-py has no Q4_K
quantizer (only its dequantizer), so the 4-bit format is Q4_0 (llama.cpp's plainer 4-bit blocks;
Q4_K_M keeps more precision), named as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch

from qwenforge.errors import QwenforgeError

FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_FORMATS = ("q8_0", "q4_0")
FORMATS = (*FLOAT_FORMATS, *GGUF_FORMATS)
DEFAULT_FORMATS = ("bf16", "fp16", "q8_0")
GGUF_BLOCK = 32


def parse_formats(text: str | None) -> tuple[list[str], bool]:
    """(formats, lora requested) from `bf16,fp16,q8_0,lora`; q4_k_m is measured as q4_0 (see module docstring)."""
    names = [n.strip().lower() for n in (text or ",".join(DEFAULT_FORMATS)).split(",") if n.strip()]
    names = ["q4_0" if n in ("q4_k_m", "q4_k", "q4") else n for n in names]
    unknown = [n for n in names if n not in FORMATS and n != "lora"]
    if unknown:
        raise QwenforgeError(f"--formats {','.join(unknown)}: choose from {', '.join(FORMATS)}, lora")
    return [n for n in dict.fromkeys(names) if n != "lora"], "lora" in names


def gguf_round_trip(weight: torch.Tensor, name: str) -> torch.Tensor:
    """`weight` quantized and dequantized with llama.cpp's block rules for `name` (q8_0 | q4_0)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[name]
    array = weight.detach().float().numpy()
    return torch.from_numpy(dequantize(quantize(array, kind), kind).reshape(array.shape).copy())


def put(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """One parameter in format `name`: float formats round every float tensor; GGUF types quantize
    2-D weights whose rows split into 32-value blocks and keep the rest (llama.cpp's F32 norms and biases)."""
    if name in FLOAT_FORMATS:
        return tensor.to(FLOAT_FORMATS[name]).float() if tensor.is_floating_point() else tensor
    if tensor.dim() == 2 and tensor.shape[1] % GGUF_BLOCK == 0:
        return gguf_round_trip(tensor, name)
    return tensor


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

    def __init__(self, weights: Mapping, parameters: set[str], name: str):
        self.weights, self.parameters, self.name = weights, parameters, name

    def __getitem__(self, key):
        value = self.weights[key]
        return put(value, self.name) if key in self.parameters else value

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def _swap(parameters: dict, name: str):
    """Hooks that put a module's own parameters in the format while it runs, and restore them after."""
    kept = {}

    def before(module, inputs):
        for key, parameter in parameters.items():
            kept[key] = parameter.data
            parameter.data = put(parameter.data, name)

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
    if name not in FORMATS:
        raise QwenforgeError(f"format {name}: choose one of {', '.join(FORMATS)}")
    handles, maps = [], []
    try:
        for module in model.modules() if name != "fp32" else ():
            parameters = dict(module.named_parameters(recurse=False))
            hook = getattr(module, "_hf_hook", None)
            if parameters and getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                maps.append((hook, hook.weights_map))
                hook.weights_map = _FormattedWeights(hook.weights_map, set(parameters), name)
            elif parameters:
                before, after = _swap(parameters, name)
                handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
            if name in FLOAT_FORMATS:
                handles.append(module.register_forward_hook(_round_outputs(FLOAT_FORMATS[name])))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for hook, weights in maps:
            hook.weights_map = weights
