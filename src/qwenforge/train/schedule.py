"""The learning rate at each optimizer step: one function that both backends follow.

It is transformers' `get_scheduler` (linear, cosine, constant, constant_with_warmup) written
out: the MLX backend sets its optimizer's rate from it at every step, and a test checks the
rates the PyTorch Trainer logs against it, so one config gives one curve on either backend.
Steps count optimizer updates (after gradient accumulation), from 0.
"""

from __future__ import annotations

import math


def warmup_steps(settings, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the run rounded up (the Trainer's rule)."""
    if settings.warmup_steps:
        return settings.warmup_steps
    return math.ceil(total_steps * settings.warmup_ratio)


def learning_rate_at(step: int, settings, total_steps: int) -> float:
    """The rate used by optimizer step `step` (0-based) of `total_steps`."""
    base, warm = settings.learning_rate, warmup_steps(settings, total_steps)
    if settings.scheduler == "constant":
        return base  # the Trainer's constant schedule has no warmup
    if step < warm:
        return base * step / max(1, warm)
    if settings.scheduler == "constant_with_warmup":
        return base
    if settings.scheduler == "linear":
        return base * max(0.0, (total_steps - step) / max(1, total_steps - warm))
    progress = (step - warm) / max(1, total_steps - warm)  # cosine, half a period
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def learning_rates(settings, total_steps: int) -> list[float]:
    return [learning_rate_at(step, settings, total_steps) for step in range(total_steps)]
