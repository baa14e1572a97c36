"""The MLX backend: zones applied by us, our DPO loss, PEFT-format adapters, same config as PyTorch."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qwenforge.fixtures.tiny import build_tiny_checkpoint  # noqa: E402
from qwenforge.train.backends import create_backend  # noqa: E402
from qwenforge.train.backends.mlx import dpo_loss  # noqa: E402
from qwenforge.train.config import config_from_dict  # noqa: E402
from qwenforge.train.pipeline import zone_plan  # noqa: E402

RECORDS = [
    {"prompt": [{"role": "user", "content": f"question {i}?"}], "completion": [{"role": "assistant", "content": f"Picture a bench {i}. Here's the nub."}]}
    for i in range(4)
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, qwen25_tokenizer_dir):
    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("mlx") / "q2", qwen25_tokenizer_dir, num_hidden_layers=4)


def config_for(model, tmp_path):
    return config_from_dict({
        "model": str(model), "output": str(tmp_path),
        "sft": {"max_steps": 4, "batch_size": 2, "max_seq_length": 64, "learning_rate": 1e-2, "packing": False},
        "dpo": {"steps": 2, "batch_size": 1, "max_seq_length": 64},
    })


def test_dpo_loss_matches_the_formula():
    chosen, rejected = mx.array([-10.0, -3.0]), mx.array([-12.0, -2.0])
    ref_chosen, ref_rejected = mx.array([-11.0, -3.0]), mx.array([-11.0, -3.0])
    losses, margins = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    logits = np.array([(-10 + 11) - (-12 + 11), (-3 + 3) - (-2 + 3)])
    np.testing.assert_allclose(np.array(margins), 0.5 * logits, rtol=1e-6)
    np.testing.assert_allclose(np.array(losses), np.log1p(np.exp(-0.5 * logits)), rtol=1e-6)
    same, zero = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)  # policy == reference
    np.testing.assert_allclose(np.array(same), [math.log(2)] * 2, rtol=1e-6)
    assert float(mx.abs(zero).max()) == 0.0
    ipo, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(np.array(ipo), (logits - 1.0) ** 2, rtol=1e-6)


def test_both_backends_lower_the_loss_on_the_same_data(tmp_path, tiny_model):
    config = config_for(tiny_model, tmp_path)
    plan = zone_plan(config, tiny_model)
    losses = {}
    for name in ("pytorch", "mlx"):
        backend = create_backend(name)
        backend.load(tiny_model, plan, seed=0)
        backend.start_adapter()
        assert backend.trainable_parameters() == plan.trainable_parameters
        before = backend.loss(RECORDS)
        backend.sft(RECORDS, config.sft, tmp_path / name)
        losses[name] = (before, backend.loss(RECORDS))
    # Before training the adapter is a no-op (lora_B = 0): both stacks see the same model and data.
    assert abs(losses["pytorch"][0] - losses["mlx"][0]) < 1e-3 * losses["mlx"][0]
    for before, after in losses.values():
        assert after < before - 0.05, losses


def test_mlx_adapter_loads_in_peft_with_the_same_outputs(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenforge.train.zones import adapted_modules

    config = config_for(tiny_model, tmp_path)
    backend = create_backend("mlx")
    backend.load(tiny_model, zone_plan(config, tiny_model))
    backend.start_adapter()
    backend.sft(RECORDS, config.sft, tmp_path / "sft")
    result = backend.dpo(
        [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "No."}]} for r in RECORDS[:2]],
        config.dpo, tmp_path / "dpo", on_log=None,
    )
    assert result["steps"] == 2 and result["reward_margin_first"] == 0.0  # reference = the SFT policy
    backend.save_adapter(tmp_path / "adapter")
    ids = [[1, 2, 3, 4, 5, 6]]
    mlx_logits = np.array(backend.model(mx.array(ids)))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32), str(tmp_path / "adapter"))
    assert adapted_modules(peft_model) == {0: ["q_proj"], 1: ["down_proj", "up_proj", "v_proj"], 2: ["down_proj", "up_proj", "v_proj"], 3: ["down_proj", "o_proj", "up_proj"]}
    with torch.no_grad():
        torch_logits = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(mlx_logits, torch_logits, atol=2e-3, rtol=1e-3)
    with peft_model.disable_adapter(), torch.no_grad():
        base_logits = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(base_logits - torch_logits).max() > 1e-3  # the adapter really changed the model
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_4bit_base_quantizes_the_block_linears_and_keeps_the_zone_layout(tmp_path, tiny_model):
    from mlx.utils import tree_flatten

    config = config_for(tiny_model, tmp_path)
    plan = zone_plan(config, tiny_model)
    backend = create_backend("mlx")
    backend.load(tiny_model, plan, quantization="nf4", seed=0)
    backend.start_adapter()
    names = [name for name, _ in tree_flatten(backend.model.parameters())]
    quantized = {name.rsplit(".", 1)[0].removesuffix(".linear") for name in names if name.endswith(".scales")}
    # every linear of every block (7 each), and nothing else: embeddings and lm_head stay as stored
    assert len(quantized) == 7 * plan.layers and all(".layers." in name for name in quantized)
    assert backend.trainable_parameters() == plan.trainable_parameters  # LoRA on the 4-bit base, laid out by zone
    assert set(backend.wrapped) == {(row.layer, module) for row in plan.rows for module in row.modules}
    before = backend.loss(RECORDS)
    backend.sft(RECORDS, config.sft, tmp_path / "q")
    assert backend.loss(RECORDS) < before - 0.05


def test_one_config_one_learning_rate_curve_on_both_backends(tmp_path, tiny_model):
    """Warmup, cosine decay, accumulation, weight decay, clipping and checkpointing: both backends run them,
    and the rates both log are `schedule.learning_rate_at`'s."""
    from qwenforge.train.schedule import learning_rates

    shared = {"grad_accumulation": 2, "warmup_steps": 2, "scheduler": "cosine", "weight_decay": 0.01,
              "max_grad_norm": 0.5, "gradient_checkpointing": True, "learning_rate": 1e-2}
    config = config_from_dict({
        "model": str(tiny_model), "output": str(tmp_path),
        "sft": {"max_steps": 5, "batch_size": 1, "max_seq_length": 64, **shared},
        "dpo": {"steps": 3, "batch_size": 1, "max_seq_length": 64, **shared, "warmup_steps": 0, "warmup_ratio": 0.34, "scheduler": "linear"},
    })
    expected = {"sft": learning_rates(config.sft, 5), "dpo": learning_rates(config.dpo, 3)}
    assert expected["sft"][:3] == [0.0, 5e-3, 1e-2] and expected["dpo"] == [0.0, 5e-3, 1e-2]  # ratio 0.34 of 3: 2 warmup steps
    plan = zone_plan(config, tiny_model)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "No."}]} for r in RECORDS]
    for name in ("pytorch", "mlx"):
        backend = create_backend(name)
        backend.load(tiny_model, plan, seed=0)
        backend.start_adapter()
        logs = {"sft": [], "dpo": []}
        backend.sft(RECORDS, config.sft, tmp_path / name / "sft", on_log=logs["sft"].append)
        backend.dpo(pairs, config.dpo, tmp_path / name / "dpo", on_log=logs["dpo"].append)
        for stage in ("sft", "dpo"):
            rates = [r["learning_rate"] for r in logs[stage] if "learning_rate" in r]
            assert rates == pytest.approx(expected[stage], abs=1e-12), (name, stage, rates)


def test_mlx_accumulation_checkpointing_and_precision_are_real(tmp_path, tiny_model):
    from mlx.utils import tree_flatten

    def adapter_after(settings, precision_check=False):
        config = config_from_dict({"model": str(tiny_model), "output": str(tmp_path), "lora": {"dropout": 0.0},
                                   "sft": {"max_steps": 1, "max_seq_length": 64, "learning_rate": 1e-2, **settings}})
        backend = create_backend("mlx")
        backend.load(tiny_model, zone_plan(config, tiny_model), seed=0)
        backend.start_adapter()
        block_call = type(backend.model.layers[0]).__call__
        backend.sft(RECORDS[:2], config.sft, tmp_path / str(len(list(tmp_path.iterdir()))))
        assert type(backend.model.layers[0]).__call__ is block_call  # checkpointing is undone after training
        if precision_check:
            dtypes = {k.removeprefix("model."): v.dtype for k, v in tree_flatten(backend.model.parameters())}
            assert dtypes["layers.0.self_attn.q_proj.linear.weight"] == mx.bfloat16, dtypes
            assert dtypes["layers.0.self_attn.q_proj.lora_a"] == mx.float32
        return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}

    whole = adapter_after({"batch_size": 2})
    accumulated = adapter_after({"batch_size": 1, "grad_accumulation": 2})  # same two examples, two micro-batches
    checkpointed = adapter_after({"batch_size": 2, "gradient_checkpointing": True})
    for key in whole:
        np.testing.assert_allclose(accumulated[key], whole[key], atol=1e-6)
        np.testing.assert_allclose(checkpointed[key], whole[key], atol=1e-6)
    bf16 = adapter_after({"batch_size": 2, "mixed_precision": "bf16"}, precision_check=True)
    assert any(np.abs(bf16[k]).max() > 0 for k in bf16 if k.endswith("lora_b"))  # it trained


def test_settings_a_backend_cannot_honour_are_refused_in_one_line(tmp_path, tiny_model):
    from qwenforge.errors import QwenforgeError
    from qwenforge.train.backends import check_settings

    base = {"model": str(tiny_model), "output": str(tmp_path)}
    with pytest.raises(QwenforgeError, match=r"sft.optimizer: adamw-8bit is a bitsandbytes optimizer .*backend mlx"):
        check_settings(config_from_dict({**base, "backend": "mlx", "sft": {"optimizer": "adamw-8bit"}}))
    with pytest.raises(QwenforgeError, match="dpo.mixed_precision: the mlx backend holds the base weights in one dtype"):
        check_settings(config_from_dict({**base, "backend": "mlx", "sft": {"mixed_precision": "bf16"}}))
    with pytest.raises(QwenforgeError, match="sft.mixed_precision: fp16 needs a GPU"):
        check_settings(config_from_dict({**base, "sft": {"mixed_precision": "fp16"}}))  # this machine: CPU
    check_settings(config_from_dict({**base, "backend": "mlx", "sft": {"mixed_precision": "bf16"}, "dpo": {"mixed_precision": "bf16"}}))
