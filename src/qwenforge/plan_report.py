"""`qwenforge plan` output: the plan as one dict (for --json), its rich table, and the stacked-bar plot.

The memory model itself is in `qwenforge.memory`; this module only resolves the user's options into a
`Setup`, runs the plan (and `--fit`), and renders the result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qwenforge import memory
from qwenforge.arch.resolve import load_model_config
from qwenforge.arch.spec import ModelSpec, spec_from_config
from qwenforge.devices import GIB, Device, custom_device, get_device
from qwenforge.errors import QwenforgeError

DEFAULT_WEIGHTS = {"infer": "bf16", "lora": "bf16", "qlora": "nf4", "full": "bf16"}


def parse_layers(text: str | None, layers: int) -> list[int] | None:
    """'0-19,60-79' -> [0..19, 60..79]; None means every layer."""
    if not text:
        return None
    from qwenforge.arch.spec import layer_ranges

    try:
        return layer_ranges(text)
    except ValueError as error:
        raise QwenforgeError(f"--lora-layers {text}: write layer ranges like 0-19,60-79") from error


def zone_targets(zones_file: Path, spec: ModelSpec):
    """(layer, module, rank) targets and dropout from the trainer's YAML (its zones, or its preset zones)."""
    try:
        from qwenforge.train.config import load_config
        from qwenforge.train.zones import plan_zones
    except ImportError as error:
        raise QwenforgeError(f"--zones {zones_file}: this install has no trainer zone loader; give --lora-targets instead") from error
    zone_plan = plan_zones(load_config(Path(zones_file)), spec)
    targets = memory.lora_targets_per_layer(
        spec, {row.layer: row.modules for row in zone_plan.rows}, {row.layer: row.r for row in zone_plan.rows}
    )
    return targets, max((row.dropout for row in zone_plan.rows), default=0.0)


def resolve_device(device: str | None, memory_gb: float | None, kind: str = "cuda") -> Device | None:
    if device and memory_gb:
        raise QwenforgeError("give either --device NAME or --memory GB, not both")
    if device:
        return get_device(device)
    return custom_device(memory_gb, kind) if memory_gb else None


def build_setup(
    spec: ModelSpec,
    mode: str = "infer",
    weights: str | None = None,
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "auto",
    generated: int = 0,
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_targets: str = "all-linear",
    lora_layers: str | None = None,
    lora_dropout: float = 0.0,
    zones: Path | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = True,
    rope_factor: float = 1.0,
) -> memory.Setup:
    """The Setup the CLI flags describe (LoRA targets only for lora/qlora)."""
    if mode not in memory.MODES:
        raise QwenforgeError(f"--mode {mode}: choose one of {', '.join(memory.MODES)}")
    targets = ()
    if mode in ("lora", "qlora"):
        if zones:
            targets, lora_dropout = zone_targets(zones, spec)
        else:
            modules = [m.strip() for m in lora_targets.split(",") if m.strip()]
            modules = "all-linear" if modules == ["all-linear"] else modules
            targets = memory.lora_targets(spec, modules, lora_rank, parse_layers(lora_layers, spec.layers))
    return memory.Setup(
        mode=mode, weights=weights or DEFAULT_WEIGHTS[mode], context=context, generated=generated, batch=batch, kv_dtype=kv_dtype,
        lora=targets, lora_alpha=lora_alpha, lora_dropout=lora_dropout, optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing, rope_factor=rope_factor,
    )


def plan_dict(result: memory.MemoryPlan) -> dict:
    data = {
        "setup": result.setup.to_dict(),
        "lines": [
            {"component": line.component, "bytes": line.bytes, "gib": round(line.bytes / GIB, 3), "assumption": line.assumption}
            for line in result.lines
        ],
        "total_bytes": result.total,
        "total_gib": round(result.total / GIB, 3),
    }
    if result.device is not None:
        data |= {
            "usable_bytes": result.device.usable_bytes,
            "fits": result.fits,
            "headroom_bytes": result.device.usable_bytes - result.total,
        }
    return data


def plan_report(model: str, device: str | None = None, memory_gb: float | None = None, kind: str = "cuda",
                fit: str | None = None, revision: str | None = None, tokens: int | None = None, price: float | None = None, **options) -> dict:
    """Everything `qwenforge plan` prints: the plan of one setup on a device, or (--fit) the ranked setups that fit;
    with `tokens`, the training time (and cost at `price` per hour) on the device (`cpu`: this kind of CPU)."""
    from qwenforge.plan_time import training_time

    config, source = load_model_config(model, revision)
    spec = spec_from_config(config, source)
    setup = build_setup(spec, **options)
    report = {"model": model, "source": source}
    if tokens is not None:
        report["training_time"] = training_time(spec, setup.mode, tokens, device or "cpu", setup.context,
                                                setup.gradient_checkpointing, price)
    if device and device.lower() == "cpu":
        device, kind = None, "cpu"  # a throughput on record, not a memory preset
    if fit:
        target = get_device(fit)
        report["device"] = device_dict(target)
        report["fit"] = [
            plan_dict(entry["plan"]) | {k: entry[k] for k in ("largest_context", "largest_batch", "reaches_context")}
            for entry in memory.fit_device(spec, setup, target, model)
        ]
        return report
    target = resolve_device(device, memory_gb, kind)
    result = memory.plan_memory(spec, setup, target, model)
    report |= plan_dict(result)
    report["device"] = device_dict(target) if target else None
    if target:
        report["largest_context"] = memory.largest_context(spec, setup, target)
        report["largest_batch"] = memory.largest_batch(spec, setup, target)
    report["alternatives"] = [plan_dict(memory.plan_memory(spec, other, target, model)) for other in alternatives(spec, setup, model)]
    return report


def alternatives(spec: ModelSpec, setup: memory.Setup, model: str) -> list[memory.Setup]:
    """The same setup in the other weight formats its mode allows, for the plot."""
    allowed = {"infer": memory.QUALITY_ORDER, "lora": ("bf16",), "qlora": ("nf4", "int8", "gptq-int4", "awq-int4"), "full": ("bf16", "fp32")}
    others = []
    for weights in allowed[setup.mode]:
        kv = setup.kv_dtype if memory.WEIGHT_FORMATS[weights].engine == setup.format.engine else "auto"
        other = replace(setup, weights=weights, kv_dtype=kv)
        try:
            memory.validate(spec, other, model)
        except QwenforgeError:
            continue
        others.append(other)
    return others


def device_dict(device: Device) -> dict:
    return {"name": device.name, "kind": device.kind, "count": device.count, "memory_bytes": device.memory_bytes, "usable_bytes": device.usable_bytes,
            "note": device.note}


def gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def print_plan(console: Console, report: dict) -> None:
    if "fit" in report:
        print_fit(console, report)
        return
    setup = report["setup"]
    device = report.get("device")
    per_gpu = f", per GPU of {device['count']}" if device and device.get("count", 1) > 1 else ""
    table = Table(title=f"{report['model']}: {setup['mode']} with {setup['weights']} weights, context {setup['context']}, batch {setup['batch']}{per_gpu}")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("assumption", overflow="fold")
    for line in report["lines"]:
        table.add_row(line["component"], gib(line["bytes"]), line["assumption"])
    table.add_row("[bold]total[/bold]", f"[bold]{gib(report['total_bytes'])}[/bold]", "")
    console.print(table)
    if device:
        verdict = "[green]fits[/green]" if report["fits"] else "[red]does not fit[/red]"
        console.print(
            f"{device['name']}: {gib(device['usable_bytes'])} GiB usable{' per GPU' if per_gpu else ''} -> {verdict} "
            f"(headroom {gib(report['headroom_bytes'])} GiB); largest context at batch {setup['batch']}: "
            f"{report['largest_context']:,}; largest batch at context {setup['context']}: {report['largest_batch']:,}"
        )


def print_fit(console: Console, report: dict) -> None:
    device = report["device"]
    table = Table(title=f"{report['model']} on {device['name']} ({gib(device['usable_bytes'])} GiB usable): setups that fit, best first")
    for column in ("#", "setup", "GiB", "largest context", "largest batch"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for rank, entry in enumerate(report["fit"], 1):
        label = entry["setup"]
        text = f"{label['mode']} {label['weights']}"
        text += f" kv {label['kv_dtype']}" if label["mode"] == "infer" else f" {label['optimizer']}{' ckpt' if label['gradient_checkpointing'] else ''}"
        style = "" if entry["reaches_context"] else "[dim]"
        table.add_row(str(rank), style + text, gib(entry["total_bytes"]), f"{entry['largest_context']:,}", f"{entry['largest_batch']:,}")
    console.print(table)
    if not report["fit"]:
        console.print("[red]nothing fits[/red]: try a smaller model, a shorter --context or a larger device")


def plot_report(report: dict, path: Path) -> Path:
    """A stacked bar per candidate setup (components stacked), with the device's usable memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = report["fit"] if "fit" in report else [report] + [p for p in report["alternatives"] if p["setup"] != report["setup"]]
    components = [line["component"] for line in plans[0]["lines"]] if plans else []
    labels = [f"{p['setup']['weights']}\n{p['setup']['kv_dtype'] if p['setup']['mode'] == 'infer' else p['setup']['optimizer']}" for p in plans]
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(plans) + 2), 5))
    bottoms = [0.0] * len(plans)
    for component in components:
        heights = [next(line["bytes"] for line in p["lines"] if line["component"] == component) / GIB for p in plans]
        if any(heights):
            axes.bar(labels, heights, bottom=bottoms, label=component)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    device = report.get("device")
    if device:
        axes.axhline(device["usable_bytes"] / GIB, color="black", linestyle="--", label=f"{device['name']} usable")
    axes.set_ylabel("GiB")
    setup = plans[0]["setup"] if plans else {"mode": "", "context": 0, "batch": 0}
    axes.set_title(f"{report['model']}: {setup['mode']}, context {setup['context']}, batch {setup['batch']}")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
