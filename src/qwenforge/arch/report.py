"""`qwenforge spec`: the facts of a model as one dict, and their rendering as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qwenforge.arch.presets import get_preset, preset_names
from qwenforge.arch.resolve import load_model_config
from qwenforge.arch.spec import parameter_counts, spec_from_config, weight_bytes


def spec_report(model: str, revision: str | None = None) -> dict:
    """Normalized architecture, parameter counts and weight bytes of MODEL."""
    config, source = load_model_config(model, revision)
    spec = spec_from_config(config, source)
    return {
        "model": model,
        "source": source,
        "architecture": spec.to_dict() | {"architecture_class": spec.architecture},
        "parameters": parameter_counts(spec),
        "weight_bytes": weight_bytes(spec),
    }


def preset_rows() -> list[dict]:
    rows = []
    for name in preset_names():
        spec = spec_from_config(get_preset(name), f"preset {name}")
        rows.append(
            {
                "preset": name,
                "family": spec.family,
                "layers": spec.layers,
                "hidden": spec.hidden,
                "embedding_rows": spec.embedding_rows,
                "parameters": parameter_counts(spec)["total"],
            }
        )
    return rows


def preset_table(rows: list[dict]) -> Table:
    table = Table(title="Presets (official config.json values)")
    for column in ("preset", "family", "layers", "hidden", "embedding rows", "parameters"):
        table.add_column(column, justify="left" if column in ("preset", "family") else "right")
    for row in rows:
        table.add_row(
            row["preset"], row["family"], str(row["layers"]), str(row["hidden"]), f"{row['embedding_rows']:,}", human_count(row["parameters"])
        )
    return table


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def print_spec(console: Console, facts: dict) -> None:
    arch = facts["architecture"]
    table = Table(title=f"{facts['model']}  ({facts['source']})", show_header=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    rows = [
        ("family", f"{arch['family']} ({arch['architecture_class']})"),
        ("layers", arch["layers"]),
        ("hidden / intermediate", f"{arch['hidden']} / {arch['intermediate']}"),
        ("attention heads / KV heads", f"{arch['heads']} / {arch['kv_heads']}"),
        ("head_dim", arch["head_dim"]),
        ("embedding rows", f"{arch['embedding_rows']:,}"),
        ("tied embeddings", arch["tied_embeddings"]),
        ("rope theta / scaling", f"{arch['rope_theta']:g} / {arch['rope_scaling'] or 'none'}"),
        ("max positions", f"{arch['max_positions']:,}"),
        (
            "sliding window",
            f"{'on' if arch['use_sliding_window'] else 'off'} (window {arch['sliding_window']}, max_window_layers {arch['max_window_layers']})",
        ),
        ("attention biases", f"q/k/v {arch['qkv_bias']}, o {arch['o_bias']}"),
        ("q/k-norm", arch["qk_norm"]),
        ("rms_norm_eps / act", f"{arch['rms_norm_eps']:g} / {arch['hidden_act']}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)

    counts = Table(title="Parameters")
    counts.add_column("component")
    counts.add_column("parameters", justify="right")
    counts.add_column("", justify="right")
    for name, value in facts["parameters"].items():
        counts.add_row(name, f"{value:,}", human_count(value))
    console.print(counts)

    sizes = Table(title="Weight bytes")
    for precision in facts["weight_bytes"]:
        sizes.add_column(precision, justify="right")
    sizes.add_row(*(human_bytes(v) for v in facts["weight_bytes"].values()))
    console.print(sizes)
