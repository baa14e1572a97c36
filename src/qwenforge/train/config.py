"""The training config: one YAML file, validated once into frozen dataclasses.

Every error names the field and the file (`train.yaml: sft.learning_rate: expected a number,
got 'fast'`), so deeper code trusts the values. `qwenforge train CONFIG --print-config` shows
the resolved config with every default filled in.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qwenforge.errors import QwenforgeError
from qwenforge.files import read_text

LORA_PRESETS = {
    # preset: rank, alpha, modules added to every zone
    "conservative": {"r": 8, "alpha": 16, "extra_modules": ()},
    "aggressive": {"r": 16, "alpha": 32, "extra_modules": ("k_proj", "gate_proj")},
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("pytorch", "mlx")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class ZoneConfig:
    """Layers given as fractions `[0.0, 0.25]` (end exclusive) or a layer range `[0, 19]` (inclusive)."""

    name: str
    layers: tuple
    modules: tuple[str, ...]
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None


@dataclass(frozen=True)
class LoraSettings:
    preset: str = "conservative"
    r: int | None = None  # None: the preset's
    alpha: int | None = None
    dropout: float = 0.05


@dataclass(frozen=True)
class SftSettings:
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_length: int = 512
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    scheduler: str = "linear"
    gradient_checkpointing: bool = False
    # Padding-free BFD packing (TRL), one packed row per micro-step on CPU. It saves what padding
    # costs: 1.03x on the sample curriculum (answers of one length, 5% padding), 1.3-1.75x when
    # lengths spread (benchmarks/train_speed.py --spread). Off by default: it also means fewer,
    # larger optimizer steps, which changes what a short run learns.
    packing: bool = False
    save_steps: int = 50


@dataclass(frozen=True)
class DpoSettings:
    enabled: bool = True
    learning_rate: float = 5e-5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    steps: int = 20
    batch_size: int = 2
    max_seq_length: int = 512
    gradient_checkpointing: bool = False
    save_steps: int = 50


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 96
    run_dpo_below_voice: float = 1.01  # DPO runs when voice fidelity after SFT is below this
    pass_accuracy: float = 0.0
    pass_voice: float = 0.0
    stop_on_fail: bool = False
    voice_markers: tuple[str, ...] = ()
    markers_needed: int = 2
    negative_patterns: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    model: str
    output: str
    curriculum: str = "sample"  # "sample": the curriculum shipped with qwenforge
    backend: str = "pytorch"
    between_topics: str = "continue"  # continue: one adapter keeps training; merge: fold it in, start fresh
    quantization: str = "none"  # none | nf4 (QLoRA)
    seed: int = 0
    # CPU threads for torch; 0: the idle cores (cores minus the 1-minute load average, at least 1).
    # On a shared CPU two threads fighting other work ran 3-8x slower than one (benchmarks note).
    threads: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    zones: tuple[ZoneConfig, ...] | None = None  # None: lexicon / reasoning / voice preset
    sft: SftSettings = field(default_factory=SftSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    source: str = ""  # the file this came from, for error messages


def load_config(path: Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; `overrides` are dotted keys (`{"sft.max_steps": 5}`)."""
    path = Path(path)
    if not path.exists():
        raise QwenforgeError(f"{path}: config file not found; `qwenforge train --print-config` shows a full example")
    try:
        raw = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as error:
        raise QwenforgeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(raw, dict):
        raise QwenforgeError(f"{path}: expected a mapping of fields at the top level")
    base = path.parent
    for key in ("curriculum", "output", "model"):
        value = raw.get(key)
        if isinstance(value, str) and value not in ("sample", "embedded") and not Path(value).is_absolute():
            if key == "output" or (base / value).exists():  # relative paths are relative to the config file
                raw[key] = str((base / value).resolve())
    return config_from_dict(raw, str(path), overrides)


def config_from_dict(raw: dict, source: str = "<config>", overrides: dict | None = None) -> TrainConfig:
    raw = _apply_overrides(dict(raw), overrides or {})
    config = _build(TrainConfig, {**raw, "source": source}, source, "")
    _check(config)
    return config


def config_to_dict(config: TrainConfig) -> dict:
    """The resolved config as plain data (tuples as lists), for --print-config and recipes."""
    data = dataclasses.asdict(config)
    data.pop("source")
    return _plain(data)


def example_config(model: str = "embedded", output: str = "runs/voice") -> dict:
    """A full config with every default, for `--print-config` without a file."""
    from qwenforge.train.zones import preset_zones

    return config_to_dict(TrainConfig(model=model, output=output, zones=preset_zones(0)))


def _apply_overrides(raw: dict, overrides: dict) -> dict:
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise QwenforgeError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise QwenforgeError(f"{source}: {prefix}{unknown[0]}: unknown field; known: {', '.join(sorted(names - {'source'}))}")
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{prefix}{f.name}"
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise QwenforgeError(f"{source}: {where}: required field missing")
            continue
        values[f.name] = _coerce(hints[f.name], raw[f.name], source, where)
    return cls(**values)


def _coerce(hint, value, source: str, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, source, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{where}.")
    if origin is tuple or hint is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise QwenforgeError(f"{source}: {where}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise QwenforgeError(f"{source}: {where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QwenforgeError(f"{source}: {where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 2e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QwenforgeError(f"{source}: {where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise QwenforgeError(f"{source}: {where}: expected text, got {value!r}")
        return str(value)
    return value


def _choice(config: TrainConfig, where: str, value, choices) -> None:
    if value not in choices:
        raise QwenforgeError(f"{config.source}: {where}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(config: TrainConfig, where: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise QwenforgeError(f"{config.source}: {where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check(config: TrainConfig) -> None:
    """Range and choice checks that types alone do not catch."""
    _choice(config, "backend", config.backend, BACKENDS)
    _choice(config, "between_topics", config.between_topics, ("continue", "merge"))
    _choice(config, "quantization", config.quantization, ("none", "nf4"))
    _choice(config, "lora.preset", config.lora.preset, tuple(LORA_PRESETS))
    _choice(config, "sft.scheduler", config.sft.scheduler, SCHEDULERS)
    _choice(config, "dpo.loss_type", config.dpo.loss_type, DPO_LOSSES)
    if config.lora.r is not None:
        _positive(config, "lora.r", config.lora.r)
    if config.lora.alpha is not None:
        _positive(config, "lora.alpha", config.lora.alpha)
    if not 0 <= config.lora.dropout < 1:
        raise QwenforgeError(f"{config.source}: lora.dropout: must be in [0, 1), got {config.lora.dropout}")
    for block, names in (
        ("sft", ("learning_rate", "epochs", "batch_size", "grad_accumulation", "max_seq_length", "save_steps")),
        ("dpo", ("learning_rate", "beta", "steps", "batch_size", "max_seq_length", "save_steps")),
        ("evaluation", ("max_new_tokens",)),
    ):
        for name in names:
            _positive(config, f"{block}.{name}", getattr(getattr(config, block), name))
    _positive(config, "threads", config.threads, allow_zero=True)
    _positive(config, "sft.weight_decay", config.sft.weight_decay, allow_zero=True)
    if not 0 <= config.sft.warmup_ratio < 1:
        raise QwenforgeError(f"{config.source}: sft.warmup_ratio: must be in [0, 1), got {config.sft.warmup_ratio}")
    for index, zone in enumerate(config.zones or ()):
        where = f"zones[{index}]"
        if not zone.modules:
            raise QwenforgeError(f"{config.source}: {where}.modules: give at least one of {', '.join(MODULES)}")
        for module in zone.modules:
            _choice(config, f"{where}.modules", module, MODULES)
        if len(zone.layers) != 2:
            raise QwenforgeError(f"{config.source}: {where}.layers: give [start, end] as fractions or layer numbers")
        if zone.r is not None:
            _positive(config, f"{where}.r", zone.r)
        if zone.alpha is not None:
            _positive(config, f"{where}.alpha", zone.alpha)
        if zone.dropout is not None and not 0 <= zone.dropout < 1:
            raise QwenforgeError(f"{config.source}: {where}.dropout: must be in [0, 1), got {zone.dropout}")
