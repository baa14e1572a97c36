"""Zones -> the explicit per-layer adapter plan -> one PEFT LoraConfig.

A zone is a span of layers that adapts its own modules: early "lexicon" layers learn terms
through q_proj, middle "reasoning" layers through v/up/down, late "voice" layers through
o/up/down. The plan lists every (layer, module) that gets an adapter with its rank and alpha;
`qwenforge train CONFIG --show-zones` prints it, and the LoraConfig is built from it alone (one
regex `target_modules` plus `rank_pattern`/`alpha_pattern`), so what is shown is what trains.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from qwenforge.arch.spec import ATTENTION_PROJECTIONS, ModelSpec, module_shapes
from qwenforge.errors import QwenforgeError
from qwenforge.train.config import LORA_PRESETS, TrainConfig, ZoneConfig, preset_zones

ATTENTION = ATTENTION_PROJECTIONS


@dataclass(frozen=True)
class LayerAdapters:
    """One row of the plan: which modules of which layer get an adapter, at which rank."""

    layer: int
    zone: str
    modules: tuple[str, ...]
    r: int
    alpha: int
    dropout: float


@dataclass(frozen=True)
class ZonePlan:
    layers: int
    rows: tuple[LayerAdapters, ...]
    trainable_parameters: int
    total_parameters: int


def limit_to_targets(zones: tuple[ZoneConfig, ...], targets: tuple[str, ...] | None, source: str) -> tuple[ZoneConfig, ...]:
    """`lora.target_modules` (the guide's list) applied: zones keep the listed modules, and a listed
    module that no zone names joins every zone, so the guide's conservative list gives the preset
    zones and its aggressive list adds k_proj and gate_proj everywhere."""
    if targets is None:
        return zones
    named = {m for zone in zones for m in zone.modules}
    everywhere = [m for m in targets if m not in named]
    limited = []
    for zone in zones:
        modules = tuple(m for m in ATTENTION + ("gate_proj", "up_proj", "down_proj") if (m in zone.modules and m in targets) or m in everywhere)
        if not modules:
            raise QwenforgeError(f"{source}: lora.target_modules leaves zone {zone.name} with no module; list one of {', '.join(zone.modules)}")
        limited.append(dataclasses.replace(zone, modules=modules))
    return tuple(limited)


def zone_layers(zone: ZoneConfig, num_layers: int, source: str = "<config>") -> list[int]:
    """Fractions ([0.25, 0.75], end exclusive) if either bound is a float, else an inclusive layer range."""
    start, end = zone.layers
    where = f"{source}: zones[{zone.name}].layers"
    if isinstance(start, float) or isinstance(end, float):
        if not 0.0 <= start < end <= 1.0:
            raise QwenforgeError(f"{where}: fractions must satisfy 0 <= start < end <= 1, got [{start}, {end}]")
        first, stop = math.floor(start * num_layers + 0.5), math.floor(end * num_layers + 0.5)  # half up
        return list(range(first, stop))
    if not 0 <= start <= end < num_layers:
        raise QwenforgeError(
            f"{where}: layer range [{start}, {end}] is outside the model's layers 0-{num_layers - 1}; use fractions or fix the range"
        )
    return list(range(start, end + 1))


def plan_zones(config: TrainConfig, spec: ModelSpec, total_parameters: int = 0) -> ZonePlan:
    """Every layer with adapters, its zone, modules, rank and alpha; overlapping zones are refused."""
    preset = LORA_PRESETS[config.lora.preset]
    zones = limit_to_targets(config.zones or preset_zones(spec.layers, config.lora.preset), config.lora.target_modules, config.source)
    owner: dict[int, str] = {}
    rows = []
    for zone in zones:
        r = zone.r or config.lora.r or preset["r"]
        alpha = zone.alpha or config.lora.alpha or preset["alpha"]
        dropout = config.lora.dropout if zone.dropout is None else zone.dropout
        for layer in zone_layers(zone, spec.layers, config.source):
            if layer in owner:
                raise QwenforgeError(
                    f"{config.source}: zones[{zone.name}]: layer {layer} is already in zone {owner[layer]}; zones must not overlap"
                )
            owner[layer] = zone.name
            rows.append(LayerAdapters(layer, zone.name, tuple(zone.modules), r, alpha, dropout))
    rows.sort(key=lambda row: row.layer)
    shapes = module_shapes(spec)
    trainable = sum(row.r * sum(shapes[m]) for row in rows for m in row.modules)
    return ZonePlan(spec.layers, tuple(rows), trainable, total_parameters)


def _module_regex(layers: list[int], modules: tuple[str, ...]) -> str:
    layer_part = "|".join(str(layer) for layer in layers)
    module_part = "|".join(modules)
    return rf"layers\.(?:{layer_part})\.(?:self_attn|mlp)\.(?:{module_part})"


def _groups(plan: ZonePlan) -> list[tuple[list[int], tuple[str, ...], int, int]]:
    """Rows with equal (modules, r, alpha) grouped, so the regex stays one alternative per zone."""
    groups: dict[tuple, list[int]] = {}
    for row in plan.rows:
        groups.setdefault((row.modules, row.r, row.alpha), []).append(row.layer)
    return [(layers, modules, r, alpha) for (modules, r, alpha), layers in groups.items()]


def lora_config(plan: ZonePlan):
    """One standard PEFT LoraConfig expressing the plan exactly."""
    from peft import LoraConfig

    if not plan.rows:
        raise QwenforgeError("the zone plan gives no layer an adapter; check the zones' layers")
    groups = _groups(plan)
    target = "|".join(f"(?:.*\\.)?{_module_regex(layers, modules)}" for layers, modules, _, _ in groups)
    first = plan.rows[0]
    return LoraConfig(
        r=first.r,
        lora_alpha=first.alpha,
        lora_dropout=max(row.dropout for row in plan.rows),
        target_modules=target,
        rank_pattern={_module_regex(layers, modules): r for layers, modules, r, _ in groups},
        alpha_pattern={_module_regex(layers, modules): alpha for layers, modules, _, alpha in groups},
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_zone_dropout(peft_model, plan: ZonePlan, adapter: str = "default") -> None:
    """PEFT has one dropout per adapter; set each zone's own dropout on its modules (training-time only)."""
    import torch

    by_layer = {row.layer: row for row in plan.rows}
    for name, module in peft_model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if dropouts is None or adapter not in dropouts:
            continue
        parts = name.split(".")
        if "layers" not in parts:
            continue
        row = by_layer.get(int(parts[parts.index("layers") + 1]))
        if row is not None:
            dropouts[adapter] = torch.nn.Dropout(row.dropout) if row.dropout > 0 else torch.nn.Identity()


def adapted_modules(peft_model) -> dict[int, list[str]]:
    """What PEFT actually wrapped: layer -> module names (the check that zones are applied)."""
    found: dict[int, list[str]] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "layers" in name.split("."):
            parts = name.split(".")
            found.setdefault(int(parts[parts.index("layers") + 1]), []).append(parts[-1])
    return {layer: sorted(modules) for layer, modules in sorted(found.items())}


def zones_report(config: TrainConfig) -> dict:
    """The plan for the config's real model, as data: zones, per-layer rows, trainable count."""
    from qwenforge.arch.resolve import load_model_config
    from qwenforge.arch.spec import parameter_counts, spec_from_config

    config_dict, label = load_model_config(config.model)
    spec = spec_from_config(config_dict, label)
    total = parameter_counts(spec)["total"]
    plan = plan_zones(config, spec, total)
    zones = []
    for row in plan.rows:
        if not zones or zones[-1]["zone"] != row.zone:
            zones.append({"zone": row.zone, "layers": [row.layer, row.layer], "modules": list(row.modules), "r": row.r, "alpha": row.alpha, "dropout": row.dropout})
        zones[-1]["layers"][1] = row.layer
    shapes = module_shapes(spec)
    return {
        "model": label,
        "layers": spec.layers,
        "zones": zones,
        "rows": [
            {"layer": r.layer, "zone": r.zone, "modules": list(r.modules), "r": r.r, "alpha": r.alpha,
             "parameters": r.r * sum(sum(shapes[m]) for m in r.modules)}
            for r in plan.rows
        ],
        "layers_without_adapters": sorted(set(range(spec.layers)) - {r.layer for r in plan.rows}),
        "trainable_parameters": plan.trainable_parameters,
        "total_parameters": total,
        "target_modules": lora_config(plan).target_modules,
    }


def print_zones(console, report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Zone plan for {report['model']} ({report['layers']} layers)")
    for column in ("zone", "layers", "modules", "r", "alpha", "adapter parameters"):
        table.add_column(column)
    for zone in report["zones"]:
        first, last = zone["layers"]
        params = sum(row["parameters"] for row in report["rows"] if row["zone"] == zone["zone"])
        table.add_row(zone["zone"], f"{first}-{last}", ", ".join(zone["modules"]), str(zone["r"]), str(zone["alpha"]), f"{params:,}")
    console.print(table)
    for row in report["rows"]:
        console.print(f"  layer {row['layer']:>3} ({row['zone']}): {', '.join(row['modules'])}", markup=False)
    if report["layers_without_adapters"]:
        console.print(f"layers without adapters: {report['layers_without_adapters']}")
    share = report["trainable_parameters"] / report["total_parameters"] if report["total_parameters"] else 0
    console.print(f"trainable parameters: {report['trainable_parameters']:,} ({share:.3%} of {report['total_parameters']:,})")
