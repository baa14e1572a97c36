"""Training time and cost: FLOPs per token, the devices' stated throughputs, the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import spec_from_config
from qwenforge.errors import QwenforgeError
from qwenforge.plan_time import THROUGHPUT, forward_flops_per_token, training_flops_per_token, training_time


def preset(name: str):
    return spec_from_config(get_preset(name), f"preset {name}")


def test_flops_per_token_by_mode():
    spec = preset("Qwen2.5-7B-Instruct")
    forward = forward_flops_per_token(spec, 4096)
    matmul = 6_525_621_760 + 152_064 * 3584  # non-embedding weights (norms and biases too, a rounding error) + lm_head (the input embedding is a lookup)
    assert forward == 2 * matmul + 2 * 28 * 4096 * 28 * 128  # + causal attention: layers x sequence x query width
    assert training_flops_per_token(spec, "full", 4096, False) == 3 * forward
    assert training_flops_per_token(spec, "lora", 4096, False) == 2 * forward  # no weight gradients for the frozen base
    assert training_flops_per_token(spec, "qlora", 4096, True) == 3 * forward  # + the recomputed forward


def test_time_and_cost_follow_the_stated_throughput():
    spec = preset("Qwen2.5-72B-Instruct")
    estimate = training_time(spec, "qlora", 10_000_000, "h100-80gb", 4096, True, price_per_hour=3.0)
    assert estimate["device"] == "H100-80GB" and "Llama 3" in estimate["source"]
    assert estimate["seconds"] == pytest.approx(1e7 * training_flops_per_token(spec, "qlora", 4096, True) / THROUGHPUT["H100-80GB"][0])
    assert estimate["cost"] == pytest.approx(estimate["hours"] * 3.0)
    with pytest.raises(QwenforgeError, match="--device RTX-4090: no training throughput on record; known: cpu"):
        training_time(spec, "lora", 1000, "RTX-4090", 4096)
    with pytest.raises(QwenforgeError, match="needs --mode lora, qlora or full"):
        training_time(spec, "infer", 1000, "cpu", 4096)


def test_the_a100_figure_gives_back_llama2_70b_gpu_hours():
    """Llama 2 70B (2.0T tokens, 4,096-token rows) took 1,720,320 A100-80GB GPU-hours (Llama 2 paper, Table 2)."""
    llama2_70b = spec_from_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }, "Llama-2-70B config")
    estimate = training_time(llama2_70b, "full", 2_000_000_000_000, "A100-80GB", 4096, gradient_checkpointing=False)
    assert estimate["hours"] == pytest.approx(1_720_320, rel=0.06)  # the figure counts 6N; attention adds ~4%


def test_plan_tokens_from_the_command_line():
    from qwenforge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "Qwen2.5-7B-Instruct", "--mode", "lora", "--context", "2048", "--tokens", "1000000",
                                 "--device", "cpu", "--price", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)["training_time"]
    assert estimate["device"] == "cpu" and estimate["cost"] == pytest.approx(estimate["hours"] * 0.5) and "measured here" in estimate["source"]
    result = runner.invoke(app, ["plan", "Qwen2.5-7B-Instruct", "--mode", "lora", "--tokens", "1000", "--device", "L40S"])
    assert result.exit_code != 0 and "no training throughput on record" in str(result.exception)
