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

import copy

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


def _round_outputs(dtype: torch.dtype):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output.to(dtype).float()
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].is_floating_point():
            return (output[0].to(dtype).float(), *output[1:])
        return output

    return hook


@torch.no_grad()
def in_format(model, name: str):
    """A copy of the float32 `model` in format `name` (see the module docstring); the original is untouched."""
    if name not in FORMATS:
        raise QwenforgeError(f"format {name}: choose one of {', '.join(FORMATS)}")
    copied = copy.deepcopy(model)
    if name == "fp32":
        return copied
    if name in FLOAT_FORMATS:
        dtype = FLOAT_FORMATS[name]
        for parameter in copied.parameters():
            parameter.copy_(parameter.to(dtype).float())
        for module in copied.modules():
            module.register_forward_hook(_round_outputs(dtype))
        return copied
    seen = set()
    for parameter in copied.parameters():
        if parameter.dim() == 2 and parameter.shape[1] % GGUF_BLOCK == 0 and id(parameter) not in seen:
            seen.add(id(parameter))  # a tied embedding is one tensor, quantized once
            parameter.copy_(gguf_round_trip(parameter, name))
    return copied
