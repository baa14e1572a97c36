"""Accelerators as data: how much memory each has and how much of it a model may use.

`qwenforge plan --device NAME` and `--fit NAME` read this table (`8xH100-80GB` for several GPUs);
`--memory GB` makes a custom entry.
NVIDIA figures are the totals `nvidia-smi` reports (MiB); the CUDA context is not subtracted here
because the plan counts it as its own "framework overhead" line. Apple figures are the share of
unified memory macOS lets the GPU wire by default (`recommendedMaxWorkingSetSize`): about 75% of
RAM on machines with more than 36 GB, about two thirds below (`sudo sysctl iogpu.wired_limit_mb`
raises it).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, replace

from qwenforge.errors import QwenforgeError

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "cuda", "mps" (Apple unified memory) or "cpu"
    memory_bytes: int  # what the machine has
    usable_bytes: int  # what one model process may use (per GPU)
    note: str
    count: int = 1  # identical GPUs the model is spread over ("8xH100-80GB")


def _nvidia(name: str, mib: int, note: str) -> Device:
    return Device(name, "cuda", mib * MIB, mib * MIB, note)


def _apple(chip: str, gib: int) -> Device:
    share = 0.75 if gib > 36 else 2 / 3
    return Device(
        f"{chip}-{gib}GB",
        "mps",
        gib * GIB,
        int(gib * GIB * share),
        f"Apple {chip.replace('-', ' ')} {gib} GB unified memory; {share:.0%} usable by the GPU by default",
    )


DEVICES: dict[str, Device] = {
    device.name: device
    for device in [
        _nvidia("H100-80GB", 81559, "NVIDIA H100 80GB HBM3 (SXM/PCIe)"),
        _nvidia("H200-141GB", 143771, "NVIDIA H200 141GB HBM3e"),
        _nvidia("A100-40GB", 40960, "NVIDIA A100 40GB"),
        _nvidia("A100-80GB", 81920, "NVIDIA A100 80GB"),
        _nvidia("L40S", 46068, "NVIDIA L40S 48GB GDDR6"),
        _nvidia("RTX-4090", 24564, "NVIDIA GeForce RTX 4090 24GB"),
        _nvidia("RTX-3090", 24576, "NVIDIA GeForce RTX 3090 24GB"),
        *[_apple("M2-Max", gib) for gib in (32, 64, 96)],
        *[_apple("M3-Max", gib) for gib in (36, 48, 64, 96, 128)],
        *[_apple("M2-Ultra", gib) for gib in (64, 128, 192)],
        *[_apple("M3-Ultra", gib) for gib in (96, 256, 512)],
    ]
}


def device_names() -> list[str]:
    return list(DEVICES)


def get_device(name: str) -> Device:
    """The preset NAME (case-insensitive), or COUNTxNAME for several ("8xH100-80GB"); an unknown name lists the close ones."""
    several = re.match(r"^\s*(\d+)\s*[x×*]\s*(.+)$", name)
    if several:
        count = int(several.group(1))
        if count < 1:
            raise QwenforgeError(f"{name}: give at least one device, e.g. 8xH100-80GB")
        one = get_device(several.group(2))
        return replace(one, name=f"{count}x{one.name}", note=f"{count} x {one.note}", count=count) if count > 1 else one
    for key, device in DEVICES.items():
        if key.lower() == name.lower():
            return device
    close = difflib.get_close_matches(name.upper(), [key.upper() for key in DEVICES], n=3, cutoff=0.3)
    names = [key for key in DEVICES if key.upper() in close]
    hint = f"did you mean {', '.join(names)}? " if names else ""
    raise QwenforgeError(
        f"unknown device {name!r}: {hint}choose one of {', '.join(DEVICES)}, or give --memory GB for any other machine"
    )


def custom_device(memory_gb: float, kind: str = "cuda") -> Device:
    """A device known only by its usable memory (`--memory GB`, GiB: 1 GB = 2**30 bytes here)."""
    if memory_gb <= 0:
        raise QwenforgeError(f"--memory {memory_gb}: give the usable memory in GB, e.g. --memory 24")
    size = int(memory_gb * GIB)
    return Device(f"{memory_gb:g}GB", kind, size, size, f"{memory_gb:g} GB usable ({kind})")


def available_memory(device_kind: str) -> int:
    """Bytes a model may use on this machine right now: free CUDA memory, the MPS working-set limit, or MemAvailable."""
    if device_kind == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    if device_kind == "mps":
        import torch

        return int(torch.mps.recommended_max_memory())
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
