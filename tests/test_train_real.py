"""Zone training on the real embedded Qwen2.5-Coder-0.5B-Instruct (slow: real model on the CPU)."""

from __future__ import annotations

import pytest

from qwenforge.train.pipeline import sft_trial


@pytest.mark.slow
def test_real_model_sft_lowers_the_answer_loss(tmp_path, embedded_model_dir):
    trial = sft_trial(embedded_model_dir, tmp_path, steps=2, examples=2, max_seq_length=128)
    assert trial["adapted_layers"] == 24 and trial["trainable_parameters"] > 0  # every layer of the real 0.5B has a zone
    assert trial["loss_after"] < trial["loss_before"] - 0.05, trial


@pytest.mark.slow
def test_real_model_zones_are_applied(embedded_model_dir):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qwenforge.train.config import TrainConfig
    from qwenforge.train.pipeline import zone_plan
    from qwenforge.train.zones import adapted_modules, lora_config

    plan = zone_plan(TrainConfig(model=str(embedded_model_dir), output="unused"), embedded_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(embedded_model_dir), dtype=torch.float32), lora_config(plan))
    assert adapted_modules(model) == {row.layer: sorted(row.modules) for row in plan.rows}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable_parameters
    assert sorted(adapted_modules(model)) == list(range(24))  # the real Qwen2.5-0.5B's 24 layers, first to last
