"""Several training processes under `accelerate launch`: one writes, all train in step.

Every process runs the same pipeline so the trainers stay in lockstep (DDP all-reduces the
gradients), but only the main process touches the run folder, evaluates or prints; the others
wait for its result, which it broadcasts, so every rank takes the same decisions (run DPO or not,
stop or go on) and raises the same error. With a sharded model (FSDP, ZeRO-3) every process
takes part in evaluation's forward passes and the main one records the scores (not run here: no
GPUs). Outside `accelerate launch` these are no-ops.
"""

from __future__ import annotations

from qwenforge.errors import QwenforgeError


def join() -> None:
    """Join the process group `accelerate launch` set up the environment for (gloo on CPU)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def sharded() -> bool:
    """FSDP or DeepSpeed ZeRO (set by `accelerate launch`): a forward pass needs every process."""
    import os

    return world_size() > 1 and any(
        os.environ.get(key, "").lower() == "true" for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def on_main(function, *args, **kwargs):
    """`function(...)` on the main process; every process returns its result or raises its error."""
    dist = _dist()
    if dist is None:
        return function(*args, **kwargs)
    box = [None]
    error = None
    if dist.get_rank() == 0:
        try:
            box = [("ok", function(*args, **kwargs))]
        except Exception as caught:  # noqa: BLE001 - re-raised here, reported to the others
            error = caught
            box = [("error", f"{caught}", isinstance(caught, QwenforgeError))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        raise (QwenforgeError if box[0][2] else RuntimeError)(f"main process: {box[0][1]}")
    return box[0][1]


def gather(value) -> list:
    """Every process's `value`, in rank order (on every process)."""
    dist = _dist()
    if dist is None:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def any_set(flag: bool) -> bool:
    """True on every process when any process has it set (a Ctrl-C stop must stop all in the same step)."""
    dist = _dist()
    if dist is None:
        return flag
    import torch

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
