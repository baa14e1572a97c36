"""How far a model's context reaches, natively and with YaRN, by the rule Qwen documents.

Qwen2.5 (7B and up), QwQ and Qwen3 run 32,768 tokens natively and up to 131,072 with
`"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}`.
Qwen3 and QwQ configs say max_position_embeddings 40,960: the 32,768-token window plus 8,192 set
aside for the answer, so YaRN scales 32,768, not 40,960 (4 x 40,960 = 163,840 would be wrong).
The planner and every engine of the loader use this one rule.
"""

from __future__ import annotations

import math

from qwenforge.errors import QwenforgeError

QWEN_WINDOW = 32_768
QWEN_ANSWER_RESERVE = 8_192  # Qwen3/QwQ: max_position_embeddings 40,960 = 32,768 + 8,192
MAX_YARN_FACTOR = 4.0  # the largest factor Qwen documents and evaluated


def native_window(spec) -> int:
    """The context the model was trained for: what YaRN's factor multiplies."""
    scaling = spec.rope_scaling or {}
    if scaling.get("original_max_position_embeddings"):
        return int(scaling["original_max_position_embeddings"])
    if QWEN_WINDOW < spec.max_positions <= QWEN_WINDOW + QWEN_ANSWER_RESERVE:
        return QWEN_WINDOW
    return spec.max_positions


def context_limit(spec, rope_factor: float = 1.0) -> int:
    """Tokens the model reaches: natively (factor 1), with the config's own YaRN, or with YaRN at `rope_factor`."""
    if not spec.max_positions:
        return 1 << 30
    scaling = spec.rope_scaling or {}
    factor = float(scaling.get("factor") or 1.0) if _is_yarn(scaling) else 1.0
    if rope_factor > 1:
        factor = rope_factor
    if factor <= 1:
        return spec.max_positions
    return int(native_window(spec) * factor)


def yarn_factor(spec, context: int) -> float:
    """The smallest YaRN factor (a whole number or a half, as Qwen's examples use) for `context` tokens; 1.0 when it fits."""
    if context <= spec.max_positions or not spec.max_positions:
        return 1.0
    return math.ceil(2 * context / native_window(spec)) / 2


def yarn_scaling(spec, context: int, model: str = "the model") -> dict | None:
    """The rope_scaling that lets `context` tokens fit at load time; None when it fits as configured; refusal when it cannot."""
    if context <= context_limit(spec):
        return None
    scaling = spec.rope_scaling or {}
    if scaling and not _is_yarn(scaling):
        raise QwenforgeError(f"--context {context}: {model} already uses rope scaling {scaling.get('rope_type') or scaling.get('type')!r}; stay within {context_limit(spec):,} tokens")
    factor = yarn_factor(spec, context)
    if factor > MAX_YARN_FACTOR:
        most = int(native_window(spec) * MAX_YARN_FACTOR)
        raise QwenforgeError(f"--context {context}: beyond {most:,} tokens ({native_window(spec):,} x YaRN factor 4, the most Qwen documents) for {model}; use --context {most}")
    return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": native_window(spec)}


def _is_yarn(scaling: dict) -> bool:
    return (scaling.get("rope_type") or scaling.get("type")) == "yarn"
