"""The training config: defaults, round trip through --print-config, errors naming field and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qwenforge.errors import QwenforgeError
from qwenforge.train.config import config_from_dict, config_to_dict, example_config, load_config


def write(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_print_config_round_trips(tmp_path):
    path = write(tmp_path, yaml.safe_dump(example_config(output=str(tmp_path / "out"))))
    config = load_config(path)
    assert config_to_dict(config) == example_config(output=str(tmp_path / "out"))
    assert config.sft.learning_rate == 2e-4 and config.lora.preset == "conservative"
    assert [z.name for z in config.zones] == ["lexicon", "reasoning", "voice"]


def test_defaults_and_relative_output(tmp_path):
    config = load_config(write(tmp_path, "model: embedded\noutput: runs/a\nsft: {learning_rate: 1e-3}\n"))
    assert config.output == str((tmp_path / "runs" / "a").resolve())
    assert config.sft.learning_rate == 1e-3  # YAML reads 1e-3 as text; it is still a number here
    assert config.dpo.beta == 0.1 and config.zones is None and config.curriculum == "sample"


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: embedded\noutput: o\nsft: {learning_rate: fast}\n", "sft.learning_rate: expected a number"),
        ("model: embedded\noutput: o\nsft: {epochs: 1, batchsize: 2}\n", "sft.batchsize: unknown field"),
        ("output: o\n", "model: required field missing"),
        ("model: embedded\noutput: o\nbackend: jax\n", "backend: 'jax' is not one of pytorch, mlx"),
        ("model: embedded\noutput: o\ndpo: {beta: 0}\n", "dpo.beta: must be > 0"),
        ("model: embedded\noutput: o\nzones: [{name: a, layers: [0, 3], modules: [qproj]}]\n", "zones[0].modules: 'qproj'"),
        ("model: embedded\noutput: o\nsft: {packing: 1}\n", "sft.packing: expected true or false"),
        ("model: [embedded\n", "not valid YAML"),
    ],
)
def test_errors_name_field_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(QwenforgeError) as error:
        load_config(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_overrides_use_dotted_keys():
    config = config_from_dict({"model": "embedded", "output": "o"}, overrides={"sft.max_steps": 7, "dpo.steps": None})
    assert config.sft.max_steps == 7 and config.dpo.steps == 20
    with pytest.raises(QwenforgeError, match="sft.max_steps: expected an integer"):
        config_from_dict({"model": "embedded", "output": "o"}, overrides={"sft.max_steps": "many"})


def test_threads_default_to_every_core_or_omp_num_threads(monkeypatch):
    import os

    import torch

    from qwenforge.train.pipeline import cpu_threads, torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # other work does not shrink the count
    config = config_from_dict({"model": "embedded", "output": "o"})
    assert cpu_threads(config) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(config) == 3
    assert cpu_threads(config_from_dict({"model": "embedded", "output": "o"}, overrides={"threads": 2})) == 2  # --threads wins
    with pytest.raises(QwenforgeError, match="threads: must be >= 0"):
        config_from_dict({"model": "embedded", "output": "o", "threads": -1})
    before = torch.get_num_threads()
    with torch_threads(config_from_dict({"model": "embedded", "output": "o", "threads": 1})) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before  # restored for whatever runs next in the process


GUIDE = Path(__file__).parent / "fixtures" / "guide-train.yaml"


def test_the_guide_yaml_loads_with_a_notice_per_alias():
    config = load_config(GUIDE)
    assert config.sft.grad_accumulation == 4 and config.sft.epochs == 3 and config.sft.warmup_steps == 50
    assert config.sft.mixed_precision == "bf16" and config.sft.scheduler == "cosine" and config.sft.weight_decay == 0.01
    assert config.dpo.grad_accumulation == 2 and config.dpo.steps == 100 and config.dpo.learning_rate == 1e-7
    assert config.lora.target_modules == ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    used = sorted(n.split(": ")[1].split(" is read")[0] for n in config.notices)
    assert used == ["dpo.gradient_accumulation", "dpo.steps_per_topic", "sft.bf16_mixed_precision",
                    "sft.epochs_per_topic", "sft.gradient_accumulation"]
    assert all(n.startswith(str(GUIDE)) and "\n" not in n for n in config.notices)
    assert "sft.bf16_mixed_precision is read as sft.mixed_precision: bf16" in " ".join(config.notices)
    # a command-line override replaces the guide's name for the same field instead of clashing with it
    assert load_config(GUIDE, {"dpo.steps": 3, "sft.max_steps": 2}).dpo.steps == 3


def test_alias_and_its_field_together_are_refused(tmp_path):
    path = write(tmp_path, "model: embedded\noutput: o\nsft: {gradient_accumulation: 2, grad_accumulation: 4}\n")
    with pytest.raises(QwenforgeError, match="sft.gradient_accumulation: also given as sft.grad_accumulation; keep one"):
        load_config(path)
    path = write(tmp_path, "model: embedded\noutput: o\nzones: [{name: a, layers: [0, 1], target_modules: [q_proj]}]\n")
    config = load_config(path)
    assert config.zones[0].modules == ("q_proj",) and "zones[0].target_modules is read as zones[0].modules" in config.notices[0]


def test_guide_target_modules_give_the_guide_zones():
    from qwenforge.arch.resolve import load_model_config
    from qwenforge.arch.spec import spec_from_config
    from qwenforge.train.zones import plan_zones

    spec = spec_from_config(load_model_config("Qwen2.5-72B-Instruct")[0])  # the guide's model: 80 layers
    conservative = plan_zones(load_config(GUIDE), spec)
    assert {row.zone: row.modules for row in conservative.rows} == {
        "lexicon": ("q_proj",), "reasoning": ("v_proj", "up_proj", "down_proj"), "voice": ("o_proj", "up_proj", "down_proj")}
    aggressive = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    zones = {row.zone: row.modules for row in plan_zones(config_from_dict({"model": "m", "output": "o", "lora": {"target_modules": aggressive}}), spec).rows}
    assert zones["lexicon"] == ("q_proj", "k_proj", "gate_proj")  # the guide's aggressive list adds k_proj and gate_proj everywhere
    with pytest.raises(QwenforgeError, match="lora.target_modules leaves zone lexicon with no module"):
        plan_zones(config_from_dict({"model": "m", "output": "o", "lora": {"target_modules": ["v_proj"]}}), spec)


def test_gates_default_to_the_guide_targets_and_can_be_changed():
    from qwenforge.train.pipeline import topic_passes

    gates = config_from_dict({"model": "embedded", "output": "o"}).evaluation
    assert (gates.pass_voice, gates.pass_accuracy) == (0.85, 0.85)  # the guide's "Expected Results"
    assert topic_passes({"accuracy": 0.9, "voice": 0.86}, gates)
    assert not topic_passes({"accuracy": 0.9, "voice": 0.84}, gates)
    assert not topic_passes({"accuracy": 0.8, "voice": 0.9}, gates)
    lowered = config_from_dict({"model": "embedded", "output": "o", "evaluation": {"pass_voice": 0.5, "pass_accuracy": 0}}).evaluation
    assert topic_passes({"accuracy": 0.1, "voice": 0.6}, lowered)
    with pytest.raises(QwenforgeError, match="evaluation.pass_voice: scores are in \\[0, 1\\], got 85"):
        config_from_dict({"model": "embedded", "output": "o", "evaluation": {"pass_voice": 85}})


def test_pytorch_backend_settings_mps_and_bitsandbytes(monkeypatch):
    import importlib.util

    import torch

    from qwenforge.train.backends import backend_plans
    from qwenforge.train.backends.pytorch import refusal, stage_args, train_device

    config = config_from_dict({"model": "embedded", "output": "o", "sft": {"optimizer": "paged-adamw-8bit", "warmup_steps": 5,
                                                                            "max_grad_norm": 0.3, "mixed_precision": "bf16"}})
    args = stage_args(config.sft)
    assert (args["optim"], args["warmup_steps"], args["max_grad_norm"], args["bf16"]) == ("paged_adamw_8bit", 5, 0.3, True)
    assert stage_args(config_from_dict({"model": "m", "output": "o", "sft": {"warmup_ratio": 0.1}}).sft)["warmup_steps"] == 0.1
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else object())
    assert refusal(config.sft, "cpu").startswith("optimizer: paged-adamw-8bit needs bitsandbytes")
    assert backend_plans(config)["pytorch"]["sft"].startswith("refused: sft.optimizer")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert train_device() == "mps"  # Apple's GPU is used when present
    assert refusal(config_from_dict({"model": "m", "output": "o", "sft": {"mixed_precision": "fp16"}}).sft, "mps") is None
