"""`qwenforge plan --mode lora|qlora|full --tokens N --device D [--price USD]`: how long training takes, and its cost.

Time = tokens x training FLOPs per token / the device's effective training FLOP/s. FLOPs per token:
the forward pass is 2 x every matmul weight (lm_head included) + causal attention (2 x layers x
sequence x query width); full training adds the backward's 2 x forward; LoRA and QLoRA add one
forward's worth (gradients flow through the frozen base, its weights get none); gradient
checkpointing adds one more forward. Each device's effective FLOP/s comes from one measured or
published throughput, named in THROUGHPUT with its source; a device without one is refused.
"""

from __future__ import annotations

from qwenforge.arch.spec import ModelSpec, parameter_counts
from qwenforge.errors import QwenforgeError

# Effective training FLOP/s per device, each from one throughput with its source.
THROUGHPUT = {
    "cpu": (
        3.06e9,
        "measured here: LoRA SFT of the embedded Qwen2.5-Coder-0.5B, 742 tokens in 482 s on 2 threads of a 2-core VM "
        "shared with other work (load 12.9) (benchmarks/train_time.py, 2026-12-02); an idle CPU of this size is faster",
    ),
    "A100-80GB": (
        1.34e14,
        "Llama 2 paper (Touvron et al. 2023, Table 2): Llama-2-70B, 2.0T tokens in 1,720,320 A100-80GB GPU-hours = "
        "323 tokens/s/GPU x 6 x 69.0B = 134 TFLOP/s (43% of 312)",
    ),
    "H100-80GB": (
        4.0e14,
        "Llama 3 paper (Dubey et al. 2024, Table 4): 38-43% MFU on H100s (989 dense bf16 TFLOP/s) -> 40% = 400 TFLOP/s",
    ),
}
THROUGHPUT["A100-40GB"] = THROUGHPUT["A100-80GB"]  # same chip
THROUGHPUT["H200-141GB"] = (THROUGHPUT["H100-80GB"][0], THROUGHPUT["H100-80GB"][1] + "; H200 has the H100's compute")


def forward_flops_per_token(spec: ModelSpec, sequence: int) -> float:
    """2 x matmul weights (lm_head always computed, tied or not) + causal attention over `sequence` tokens."""
    counts = parameter_counts(spec)
    matmul = counts["non_embedding"] + spec.embedding_rows * spec.hidden
    attention = 2 * spec.layers * sequence * spec.heads * spec.head_dim  # QK^T and AV, half of them masked
    return 2 * matmul + attention


def training_flops_per_token(spec: ModelSpec, mode: str, sequence: int, gradient_checkpointing: bool) -> float:
    passes = {"full": 3, "lora": 2, "qlora": 2}[mode] + (1 if gradient_checkpointing else 0)
    return passes * forward_flops_per_token(spec, sequence)


def throughput_of(device: str) -> tuple[float, str, str]:
    """(effective FLOP/s, source, canonical name) of a device with a throughput on record."""
    for name, (flops, source) in THROUGHPUT.items():
        if name.lower() == device.lower():
            return flops, source, name
    raise QwenforgeError(f"--device {device}: no training throughput on record; known: {', '.join(THROUGHPUT)}")


def training_time(spec: ModelSpec, mode: str, tokens: int, device: str, sequence: int,
                  gradient_checkpointing: bool = True, price_per_hour: float | None = None) -> dict:
    """Wall time (and cost at `price_per_hour`) to train on `tokens` tokens of `sequence`-token rows."""
    if mode not in ("lora", "qlora", "full"):
        raise QwenforgeError(f"--tokens: a training time needs --mode lora, qlora or full, not {mode}")
    if tokens < 1:
        raise QwenforgeError(f"--tokens {tokens}: give the number of tokens to train on (> 0)")
    if price_per_hour is not None and price_per_hour < 0:
        raise QwenforgeError(f"--price {price_per_hour}: a price per hour is >= 0")
    flops, source, name = throughput_of(device)
    per_token = training_flops_per_token(spec, mode, sequence, gradient_checkpointing)
    seconds = tokens * per_token / flops
    result = {
        "device": name, "mode": mode, "tokens": tokens, "sequence": sequence, "gradient_checkpointing": gradient_checkpointing,
        "flops_per_token": per_token, "effective_flops": flops, "tokens_per_second": flops / per_token,
        "seconds": seconds, "hours": seconds / 3600, "source": source,
    }
    if price_per_hour is not None:
        result |= {"price_per_hour": price_per_hour, "cost": seconds / 3600 * price_per_hour}
    return result
