"""Training backends with one interface: `create_backend("pytorch" | "mlx")`."""

from __future__ import annotations

from qwenforge.errors import QwenforgeError


def create_backend(name: str):
    """The backend object for a config's `backend` field."""
    if name == "pytorch":
        from qwenforge.train.backends.pytorch import PyTorchBackend

        return PyTorchBackend()
    if name == "mlx":
        from qwenforge.train.backends.mlx import MlxBackend

        return MlxBackend()
    raise QwenforgeError(f"backend {name!r}: choose pytorch or mlx")


def _describe(settings, backend: str) -> str:
    """One line: what a stage's optimizer settings become in this backend."""
    warm = f"warmup {settings.warmup_steps} steps" if settings.warmup_steps else f"warmup ratio {settings.warmup_ratio}"
    optimizer = {"pytorch": "torch AdamW", "mlx": "mlx AdamW (bias-corrected, as torch's)"}[backend] if settings.optimizer == "adamw" else f"bitsandbytes {settings.optimizer}"
    if settings.mixed_precision == "none":
        precision = "float32"
    elif backend == "pytorch":
        precision = f"{settings.mixed_precision} autocast, float32 weights"
    else:
        precision = f"{settings.mixed_precision} base weights, float32 adapters"
    clip = f"clip grad norm {settings.max_grad_norm:g}" if settings.max_grad_norm else "no clipping"
    return (f"{optimizer} lr {settings.learning_rate:g} {settings.scheduler} ({warm}), weight decay {settings.weight_decay:g}; "
            f"{settings.grad_accumulation} micro-batch(es) of {settings.batch_size} per step; {clip}; {precision}; "
            f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}")


def backend_plans(config) -> dict:
    """For each backend, on this machine: its device and, per stage, what it will do or why it refuses."""
    import importlib.util

    plans = {}
    for name in ("pytorch", "mlx"):
        if name == "pytorch":
            from qwenforge.train.backends.pytorch import refusal, train_device

            device, run_wide = train_device(), None
        else:
            from qwenforge.train.backends.mlx import check_run, refusal

            device = "mlx" if importlib.util.find_spec("mlx") else "not installed (pip install 'qwenforge[mlx]')"
            run_wide = check_run(config)
        plan = {"device": device}
        for block in ("sft", "dpo"):
            settings = getattr(config, block)
            why = refusal(settings, device)
            plan[block] = f"refused: {block}.{why}" if why else _describe(settings, name)
        if run_wide:
            plan["dpo"] = f"refused: {run_wide}"
        plans[name] = plan
    return plans


def check_settings(config) -> None:
    """Refuse, in one line naming the field, any SFT/DPO setting the configured backend cannot honour here."""
    plan = backend_plans(config)[config.backend]
    for block in ("sft", "dpo") if config.dpo.enabled else ("sft",):
        if plan[block].startswith("refused: "):
            raise QwenforgeError(f"{config.source}: {plan[block].removeprefix('refused: ')} (backend {config.backend}, device {plan['device']})")
