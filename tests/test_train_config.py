"""The training config: defaults, round trip through --print-config, errors naming field and file."""

from __future__ import annotations

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


def test_threads_default_to_the_idle_cores(monkeypatch):
    import os

    import torch

    from qwenforge.train.pipeline import cpu_threads, torch_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    config = config_from_dict({"model": "embedded", "output": "o"})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cpu_threads(config) == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert cpu_threads(config) == 1  # round(4 - 2.6)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cpu_threads(config) == 1
    assert cpu_threads(config_from_dict({"model": "embedded", "output": "o", "threads": 3})) == 3
    with pytest.raises(QwenforgeError, match="threads: must be >= 0"):
        config_from_dict({"model": "embedded", "output": "o", "threads": -1})
    before = torch.get_num_threads()
    with torch_threads(config_from_dict({"model": "embedded", "output": "o", "threads": 1})) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before  # restored for whatever runs next in the process
