"""A memory plan split over N identical GPUs: what each one holds (`plan --devices 8xH100-80GB`, the loader).

Inference spreads the layers (transformers' device_map) or the heads (vLLM tensor parallel): each
GPU holds 1/N of the weights and of the KV cache (tensor parallel cannot split fewer KV heads than
GPUs: those are copied). Training shards parameters, gradients and optimizer states with ZeRO-3 or
FSDP FULL_SHARD (the accelerate configs qwenforge ships) while each GPU runs its own micro-batch,
so activations and logits stay whole. The framework overhead is paid on every GPU.
"""

from __future__ import annotations

from dataclasses import replace

SHARDED_IN_TRAINING = ("weights", "quantization constants", "LoRA adapters", "gradients", "optimizer states")
SHARDED_IN_INFERENCE = ("weights", "quantization constants", "LoRA adapters")


def divisors(spec, setup, count: int) -> dict[str, int]:
    """How many ways each component is split across `count` GPUs."""
    if setup.training:
        return {component: count for component in SHARDED_IN_TRAINING}
    return {component: count for component in SHARDED_IN_INFERENCE} | {"KV cache": min(count, spec.kv_heads)}


def split_lines(spec, setup, lines, count: int) -> list:
    """Per-GPU lines: each sharded component divided (rounded up), its assumption saying how."""
    how = "ZeRO-3/FSDP shards" if setup.training else "tensor parallel / device_map spreads"
    split = divisors(spec, setup, count)
    out = []
    for line in lines:
        parts = split.get(line.component, 1)
        if parts > 1 and line.bytes:
            copies = f"; {spec.kv_heads} KV heads cannot split {count} ways" if line.component == "KV cache" and parts < count else ""
            line = replace(line, bytes=-(-line.bytes // parts), assumption=f"{line.assumption}; {how} it over {parts} GPUs{copies}")
        elif count > 1 and line.bytes and line.component in ("activations", "logits"):
            line = replace(line, assumption=f"{line.assumption}; per GPU (each runs its own {'micro-batch' if setup.training else 'forward'})")
        out.append(line)
    return out


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
    from qwenforge import memory
    from qwenforge.devices import Device

    sizes = tensor_parallel_size(spec, max(count, 1))
    for size in sizes:
        device = Device(f"{size}xGPU", "cuda", per_gpu_bytes, per_gpu_bytes, "free memory per GPU", count=size)
        if memory.plan_memory(spec, memory.Setup(context=context), device).fits:
            return size
    return sizes[-1]  # vLLM itself then says what is short
