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

from qwenforge.arch.spec import PROJECTIONS
from qwenforge.errors import QwenforgeError
from qwenforge.files import read_text

LORA_PRESETS = {
    # preset: rank, alpha, modules added to every zone
    "conservative": {"r": 8, "alpha": 16, "extra_modules": ()},
    "aggressive": {"r": 16, "alpha": 32, "extra_modules": ("k_proj", "gate_proj")},
}
MODULES = PROJECTIONS
BACKENDS = ("pytorch", "mlx")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("none", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit")
INTERNAL = ("source", "notices")  # TrainConfig fields that no file sets
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


ZONE_MODULES = {
    "lexicon": ("q_proj",),
    "reasoning": ("v_proj", "up_proj", "down_proj"),
    "voice": ("o_proj", "up_proj", "down_proj"),
}
# Known layer counts get their split spelled out; any other count is split by these fractions.
ZONE_FRACTIONS = {"lexicon": (0.0, 0.25), "reasoning": (0.25, 0.75), "voice": (0.75, 1.0)}
ZONE_LAYER_TABLE = {
    80: {"lexicon": (0, 19), "reasoning": (20, 59), "voice": (60, 79)},  # Qwen2.5-72B, Qwen3-72B
    28: {"lexicon": (0, 6), "reasoning": (7, 20), "voice": (21, 27)},  # Qwen2.5-7B
}


def preset_zones(num_layers: int, preset: str = "conservative") -> tuple[ZoneConfig, ...]:
    """The lexicon / reasoning / voice zones for a layer count (table for 80 and 28, else fractions)."""
    extra = LORA_PRESETS[preset]["extra_modules"]
    zones = []
    for name, modules in ZONE_MODULES.items():
        layers = ZONE_LAYER_TABLE.get(num_layers, {}).get(name) or ZONE_FRACTIONS[name]
        ordered = tuple(m for m in MODULES if m in modules or m in extra)
        zones.append(ZoneConfig(name=name, layers=layers, modules=ordered))
    return tuple(zones)


@dataclass(frozen=True)
class LoraSettings:
    preset: str = "conservative"
    r: int | None = None  # None: the preset's
    alpha: int | None = None
    dropout: float = 0.05
    # The training guide's list: the modules LoRA may adapt. Zones keep those of their modules that
    # are listed; a listed module no zone names joins every zone (k_proj, gate_proj: the aggressive set).
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OptimizerSettings:
    """What SFT and DPO share: schedule, regularisation, precision and memory settings.

    Both backends honour each of these or refuse it in one line (`--print-config` shows which);
    the learning-rate curve comes from `train.schedule.learning_rate_at` on both.
    """

    grad_accumulation: int = 1
    warmup_steps: int = 0  # > 0 wins over warmup_ratio
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "none"  # none | bf16 | fp16: compute in this dtype, adapters and optimizer in float32
    optimizer: str = "adamw"  # adamw | adamw-8bit | paged-adamw | paged-adamw-8bit (the last three: bitsandbytes)
    gradient_checkpointing: bool = False
    save_steps: int = 50


@dataclass(frozen=True)
class SftSettings(OptimizerSettings):
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    max_seq_length: int = 512
    # Padding-free BFD packing (TRL), one packed row per micro-step on CPU. It saves what padding
    # costs: 1.03x on the sample curriculum (answers of one length, 5% padding), 1.3-1.75x when
    # lengths spread (benchmarks/train_speed.py --spread). Off by default: it also means fewer,
    # larger optimizer steps, which changes what a short run learns.
    packing: bool = False


@dataclass(frozen=True)
class DpoSettings(OptimizerSettings):
    enabled: bool = True
    learning_rate: float = 5e-5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    steps: int = 20
    batch_size: int = 2
    max_seq_length: int = 512


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 96
    run_dpo_below_voice: float = 1.01  # DPO runs when voice fidelity after SFT is below this
    # A topic passes at the training guide's targets ("Expected Results": voice fidelity >= 0.85,
    # accuracy >= 0.85); set either to 0 to ignore it.
    pass_accuracy: float = 0.85
    pass_voice: float = 0.85
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
    # CPU threads for torch; 0: OMP_NUM_THREADS if set, else every core (`qwenforge train --threads N`).
    threads: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    zones: tuple[ZoneConfig, ...] | None = None  # None: lexicon / reasoning / voice preset
    sft: SftSettings = field(default_factory=SftSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    source: str = ""  # the file this came from, for error messages
    notices: tuple[str, ...] = ()  # one line per alias the file used (the CLI prints them)


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
    notices: list[str] = []
    config = _build(TrainConfig, raw, source, "", notices)
    config = dataclasses.replace(config, source=source, notices=tuple(notices))
    _check(config)
    return config


def config_to_dict(config: TrainConfig) -> dict:
    """The resolved config as plain data (tuples as lists), for --print-config and recipes."""
    data = dataclasses.asdict(config)
    for name in INTERNAL:
        data.pop(name)
    return _plain(data)


def example_config(model: str = "embedded", output: str = "runs/voice") -> dict:
    """A full config with every default, for `--print-config` without a file."""
    return config_to_dict(TrainConfig(model=model, output=output, zones=preset_zones(0)))


def _apply_overrides(raw: dict, overrides: dict) -> dict:
    """Dotted keys set into the nested mapping; an override also replaces the guide's name for its field."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node[part] = dict(node.get(part) or {})  # a copy: the caller's mapping stays as it was
            node = node[part]
        for names in ALIASES.values():
            for alias, name in names.items():
                if name == leaf:
                    node.pop(alias, None)
        node[leaf] = value
    return raw


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# The zone-LoRA training guide's names for qwenforge's fields, per block; each one used gets a notice.
ALIASES = {
    "OptimizerSettings": {"gradient_accumulation": "grad_accumulation", "bf16_mixed_precision": "mixed_precision"},
    "SftSettings": {"epochs_per_topic": "epochs", "steps_per_topic": "max_steps"},
    "DpoSettings": {"steps_per_topic": "steps"},
    "ZoneConfig": {"target_modules": "modules"},
}


def _read_aliases(cls, raw: dict, source: str, prefix: str, notices: list[str]) -> dict:
    """`raw` with the guide's names replaced by qwenforge's, one notice per name replaced."""
    aliases = {k: v for klass in reversed(cls.__mro__) for k, v in ALIASES.get(klass.__name__, {}).items()}
    raw = dict(raw)
    for alias, name in aliases.items():
        if alias not in raw:
            continue
        if name in raw:
            raise QwenforgeError(f"{source}: {prefix}{alias}: also given as {prefix}{name}; keep one")
        value = raw.pop(alias)
        shown = f"{prefix}{name}"
        if alias == "bf16_mixed_precision":
            if not isinstance(value, bool):
                raise QwenforgeError(f"{source}: {prefix}{alias}: expected true or false, got {value!r}")
            value = "bf16" if value else "none"
            shown = f"{prefix}{name}: {value}"
        raw[name] = value
        notices.append(f"{source}: {prefix}{alias} is read as {shown} (the training guide's name for it)")
    return raw


def _build(cls, raw, source: str, prefix: str, notices: list[str]):
    if not isinstance(raw, dict):
        raise QwenforgeError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    raw = _read_aliases(cls, raw, source, prefix, notices)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(INTERNAL)
    unknown = sorted(set(raw) - names)
    if unknown:
        raise QwenforgeError(f"{source}: {prefix}{unknown[0]}: unknown field; known: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        where = f"{prefix}{f.name}"
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise QwenforgeError(f"{source}: {where}: required field missing")
            continue
        values[f.name] = _coerce(hints[f.name], raw[f.name], source, where, notices)
    return cls(**values)


def _coerce(hint, value, source: str, where: str, notices: list[str]):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, source, where, notices)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{where}.", notices)
    if origin is tuple or hint is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise QwenforgeError(f"{source}: {where}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{where}[{i}]", notices) for i, v in enumerate(value))
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
    _choice(config, "dpo.loss_type", config.dpo.loss_type, DPO_LOSSES)
    if config.lora.r is not None:
        _positive(config, "lora.r", config.lora.r)
    if config.lora.alpha is not None:
        _positive(config, "lora.alpha", config.lora.alpha)
    if not 0 <= config.lora.dropout < 1:
        raise QwenforgeError(f"{config.source}: lora.dropout: must be in [0, 1), got {config.lora.dropout}")
    for module in config.lora.target_modules or ():
        _choice(config, "lora.target_modules", module, MODULES)
    for block, names in (
        ("sft", ("learning_rate", "epochs", "batch_size", "max_seq_length")),
        ("dpo", ("learning_rate", "beta", "steps", "batch_size", "max_seq_length")),
        ("evaluation", ("max_new_tokens",)),
    ):
        for name in names:
            _positive(config, f"{block}.{name}", getattr(getattr(config, block), name))
    for name in ("pass_accuracy", "pass_voice"):
        if not 0 <= getattr(config.evaluation, name) <= 1:
            raise QwenforgeError(f"{config.source}: evaluation.{name}: scores are in [0, 1], got {getattr(config.evaluation, name)}")
    for block in ("sft", "dpo"):
        settings = getattr(config, block)
        _choice(config, f"{block}.scheduler", settings.scheduler, SCHEDULERS)
        _choice(config, f"{block}.mixed_precision", settings.mixed_precision, PRECISIONS)
        _choice(config, f"{block}.optimizer", settings.optimizer, OPTIMIZERS)
        for name in ("grad_accumulation", "save_steps"):
            _positive(config, f"{block}.{name}", getattr(settings, name))
        for name in ("warmup_steps", "weight_decay", "max_grad_norm"):
            _positive(config, f"{block}.{name}", getattr(settings, name), allow_zero=True)
        if not 0 <= settings.warmup_ratio < 1:
            raise QwenforgeError(f"{config.source}: {block}.warmup_ratio: must be in [0, 1), got {settings.warmup_ratio}")
    _positive(config, "threads", config.threads, allow_zero=True)
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
