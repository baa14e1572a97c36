"""Zones -> per-layer plan -> one PEFT LoraConfig: what --show-zones prints is exactly what PEFT wraps."""

from __future__ import annotations

import json

import pytest

from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import spec_from_config
from qwenforge.errors import QwenforgeError
from qwenforge.fixtures.tiny import build_tiny_checkpoint
from qwenforge.train.config import ZoneConfig, config_from_dict
from qwenforge.train.zones import (
    adapted_modules,
    lora_config,
    plan_zones,
    preset_zones,
    zone_layers,
    zones_report,
)


@pytest.fixture(scope="module")
def tiny_qwen2_six_layers(tmp_path_factory, qwen25_tokenizer_dir):
    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("zones") / "q2", qwen25_tokenizer_dir, num_hidden_layers=6)


def spans(num_layers: int) -> dict[str, tuple[int, int]]:
    result = {}
    for zone in preset_zones(num_layers):
        layers = zone_layers(zone, num_layers)
        result[zone.name] = (layers[0], layers[-1])
    return result


def test_presets_for_known_layer_counts():
    assert spans(80) == {"lexicon": (0, 19), "reasoning": (20, 59), "voice": (60, 79)}
    assert spans(28) == {"lexicon": (0, 6), "reasoning": (7, 20), "voice": (21, 27)}
    assert spans(30) == {"lexicon": (0, 7), "reasoning": (8, 22), "voice": (23, 29)}  # by fractions, half up
    # The fractions agree with the spelled-out tables, so a table is never a surprise.
    fractions = {z.name: z for z in preset_zones(0)}
    for count in (80, 28):
        for name, (first, last) in spans(count).items():
            layers = zone_layers(fractions[name], count)
            assert (layers[0], layers[-1]) == (first, last)


def test_aggressive_preset_adds_k_and_gate():
    config = config_from_dict({"model": "x", "output": "o", "lora": {"preset": "aggressive"}})
    plan = plan_zones(config, spec_from_config(get_preset("Qwen2.5-7B-Instruct")))
    assert {row.r for row in plan.rows} == {16} and {row.alpha for row in plan.rows} == {32}
    assert all({"k_proj", "gate_proj"} <= set(row.modules) for row in plan.rows)
    lexicon = [row for row in plan.rows if row.zone == "lexicon"]
    assert [row.layer for row in lexicon] == list(range(7)) and lexicon[0].modules == ("q_proj", "k_proj", "gate_proj")


def test_plan_is_what_peft_wraps(tiny_qwen2_six_layers):
    """Per-zone ranks, exact modules per layer, and the trainable count all match the real PEFT model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    zones = [
        {"name": "lexicon", "layers": [0, 1], "modules": ["q_proj"], "r": 4, "alpha": 8},
        {"name": "voice", "layers": [0.5, 1.0], "modules": ["o_proj", "down_proj"], "r": 2},
    ]
    config = config_from_dict({"model": str(tiny_qwen2_six_layers), "output": "o", "zones": zones})
    spec = spec_from_config(json.loads((tiny_qwen2_six_layers / "config.json").read_text()))
    plan = plan_zones(config, spec)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_six_layers), dtype=torch.float32), lora_config(plan))
    assert adapted_modules(model) == {0: ["q_proj"], 1: ["q_proj"], 3: ["down_proj", "o_proj"], 4: ["down_proj", "o_proj"], 5: ["down_proj", "o_proj"]}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == plan.trainable_parameters == 2 * 4 * (64 + 64) + 3 * 2 * ((64 + 64) + (128 + 64))
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert layers[0].self_attn.q_proj.scaling["default"] == 8 / 4
    assert layers[4].mlp.down_proj.lora_A["default"].weight.shape[0] == 2
    assert layers[4].mlp.down_proj.scaling["default"] == 16 / 2  # lora.alpha default (conservative: 16)
    assert not hasattr(layers[2].self_attn.q_proj, "lora_A")  # layer 2 is in no zone


@pytest.mark.parametrize(
    "zones, message",
    [
        ([{"name": "a", "layers": [0, 40], "modules": ["q_proj"]}], "zones[a].layers: layer range [0, 40] is outside the model's layers 0-27"),
        ([{"name": "a", "layers": [0.5, 0.2], "modules": ["q_proj"]}], "fractions must satisfy"),
        (
            [{"name": "a", "layers": [0, 10], "modules": ["q_proj"]}, {"name": "b", "layers": [10, 20], "modules": ["v_proj"]}],
            "zones[b]: layer 10 is already in zone a",
        ),
    ],
)
def test_bad_zones_are_refused(zones, message):
    config = config_from_dict({"model": "x", "output": "o", "zones": zones}, source="t.yaml")
    with pytest.raises(QwenforgeError) as error:
        plan_zones(config, spec_from_config(get_preset("Qwen2.5-7B-Instruct")))
    assert message in str(error.value) and "t.yaml" in str(error.value)


def test_zone_layers_ranges_are_inclusive():
    assert zone_layers(ZoneConfig("z", (3, 5), ("q_proj",)), 10) == [3, 4, 5]
    assert zone_layers(ZoneConfig("z", (0.0, 0.5), ("q_proj",)), 10) == [0, 1, 2, 3, 4]


def test_show_zones_cli_on_a_72b_preset(tmp_path):
    from typer.testing import CliRunner

    from qwenforge.cli import app

    (tmp_path / "t.yaml").write_text("model: Qwen2.5-72B-Instruct\noutput: o\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "t.yaml"), "--show-zones", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert [(z["zone"], z["layers"]) for z in report["zones"]] == [("lexicon", [0, 19]), ("reasoning", [20, 59]), ("voice", [60, 79])]
    hidden, inter, kv = 8192, 29568, 8 * 128
    per_layer = {"lexicon": 8 * (hidden + hidden), "reasoning": 8 * ((hidden + kv) + 2 * (hidden + inter)), "voice": 8 * (2 * hidden + 2 * (hidden + inter))}
    assert report["trainable_parameters"] == 20 * per_layer["lexicon"] + 40 * per_layer["reasoning"] + 20 * per_layer["voice"]
    assert report["layers_without_adapters"] == [] and len(report["rows"]) == 80
    assert zones_report  # the library function the CLI calls
