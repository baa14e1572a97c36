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
from qwenforge.train.pipeline import build_plan  # noqa: E402

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
    plan = build_plan(config, tiny_model)
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
    backend.load(tiny_model, build_plan(config, tiny_model))
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
    plan = build_plan(config, tiny_model)
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
