"""`qwenforge plan` end to end, the trainer's zone YAML, and the weights line against real loaded models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from qwenforge import memory as plan  # the memory model
from qwenforge.arch.resolve import load_model_config
from qwenforge.arch.spec import spec_from_config
from qwenforge.plan_report import plan_report, zone_targets


def run(*args):
    return subprocess.run([sys.executable, "-m", "qwenforge.cli", "plan", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


def test_plan_json_model_card_budget():
    result = run("Qwen2.5-72B-Instruct", "--mode", "qlora", "--context", "4096", "--device", "M2-Ultra-64GB", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    lines = {line["component"]: line for line in report["lines"]}
    assert report["total_bytes"] == sum(line["bytes"] for line in report["lines"])
    assert lines["logits"]["bytes"] == 4096 * 152064 * 12
    assert report["usable_bytes"] == 48 * 2**30 and report["fits"] is False
    assert report["headroom_bytes"] == report["usable_bytes"] - report["total_bytes"]
    assert 0 < report["largest_context"] < 4096 and report["largest_batch"] == 0
    assert report["setup"]["lora"]["adapters"] == 560


def test_plan_table_and_plot(tmp_path):
    png = tmp_path / "plan.png"
    result = run("Qwen3-32B", "--fit", "RTX-4090", "--context", "8192", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert "setups that fit" in result.stdout and "awq-int4" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("embedded", "--context", "2048", "--memory", "2", "--kind", "cpu")
    assert table.returncode == 0, table.stderr
    for component in ("weights", "KV cache", "framework overhead", "fits"):
        assert component in table.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["Qwen2.5-7B-Instruct", "--context", "40000"], "--rope-factor"),
        (["Qwen2.5-7B-Instruct", "--mode", "full", "--weights", "nf4"], "--mode qlora"),
        (["Qwen2.5-7B-Instruct", "--mode", "lora", "--lora-targets", "c_attn"], "no such module"),
        (["Qwen2.5-7B-Instruct", "--device", "H100"], "did you mean H100-80GB"),
    ],
)
def test_plan_errors_are_one_line_exit_2(args, expected):
    result = run(*args)
    assert result.returncode == 2 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_zone_yaml_of_the_trainer_gives_the_same_adapters(tmp_path):
    from qwenforge.train.config import example_config, load_config
    from qwenforge.train.zones import plan_zones

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(example_config()))
    spec = spec_from_config(*load_model_config("Qwen2.5-7B-Instruct"))
    targets, dropout = zone_targets(config, spec)
    assert plan.lora_parameters(spec, targets) == plan_zones(load_config(config), spec).trainable_parameters
    assert dropout == 0.05
    report = plan_report("Qwen2.5-7B-Instruct", mode="lora", zones=config, context=512)
    assert report["setup"]["lora"]["modules"] == ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _storage_bytes(model) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_qwen2_tied", "tiny_qwen3", "tiny_llama"])
def test_weights_line_equals_the_loaded_models_tensors(fixture, request):
    import torch
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    spec = spec_from_config(*load_model_config(str(folder)))
    for weights, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        rotary = sum(b.numel() * b.element_size() for b in model.buffers())  # inv_freq, not a weight
        predicted = next(line.bytes for line in plan.plan_memory(spec, plan.Setup(weights=weights, context=512)).lines if line.component == "weights")
        assert predicted == _storage_bytes(model) - rotary
