"""How many GPUs vLLM's tensor parallelism needs for a model (`serve`); what each GPU of N holds is
the memory model's own (memory.split_lines)."""

from __future__ import annotations

from qwenforge import memory
from qwenforge.devices import Device


def tensor_parallel_size(spec, count: int) -> list[int]:
    """The tensor-parallel sizes vLLM accepts for `spec` up to `count` GPUs: powers of two dividing the attention heads."""
    sizes, size = [], 1
    while size <= count:
        if spec.heads % size == 0:
            sizes.append(size)
        size *= 2
    return sizes


def vllm_tensor_parallel(spec, per_gpu_bytes: int, count: int, context: int = 4096) -> int:
    """The fewest GPUs (a size vLLM accepts) whose share of the bf16 model and its KV cache fits `per_gpu_bytes` each."""
    sizes = tensor_parallel_size(spec, max(count, 1))
    for size in sizes:
        device = Device(f"{size}xGPU", "cuda", per_gpu_bytes, per_gpu_bytes, "free memory per GPU", count=size)
        if memory.plan_memory(spec, memory.Setup(context=context), device).fits:
            return size
    return sizes[-1]  # vLLM itself then says what is short
