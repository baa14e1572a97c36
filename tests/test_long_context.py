"""Long context: YaRN by Qwen's rule (the native window x factor), in the planner and at load time."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from qwenforge import memory as plan  # the memory model
from qwenforge.arch.long_context import context_limit, native_window, yarn_scaling
from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import spec_from_config
from qwenforge.errors import QwenforgeError


def preset(name, **changes):
    return spec_from_config(get_preset(name) | changes, name)


def test_qwen_documented_limits():
    for name in ("Qwen3-32B", "QwQ-32B", "Qwen2.5-7B-Instruct"):
        assert native_window(preset(name)) == 32768
        assert context_limit(preset(name), 4) == 131072  # 32,768 x 4, not max_position_embeddings x 4
    assert context_limit(preset("Qwen3-32B")) == 40960  # natively: the config's own limit
    assert yarn_scaling(preset("Qwen3-32B"), 40000) is None
    assert yarn_scaling(preset("Qwen3-32B"), 65536) == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768}
    assert yarn_scaling(preset("Qwen2.5-7B-Instruct"), 131072)["factor"] == 4.0
    with pytest.raises(QwenforgeError, match="beyond 131,072 tokens"):
        yarn_scaling(preset("Qwen3-32B"), 131073)
    with pytest.raises(QwenforgeError, match="already uses rope scaling 'dynamic'"):
        yarn_scaling(preset("Qwen2.5-7B-Instruct", rope_scaling={"type": "dynamic", "factor": 2.0}), 65536)
    configured = preset("Qwen2.5-7B-Instruct", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert context_limit(configured) == 131072 and yarn_scaling(configured, 100000) is None


def test_plan_uses_the_same_rule():
    spec = preset("Qwen3-32B")
    plan.plan_memory(spec, plan.Setup(context=131072, rope_factor=4), model="Qwen3-32B")
    with pytest.raises(QwenforgeError, match="exceeds 131,072 tokens"):
        plan.plan_memory(spec, plan.Setup(context=163840, rope_factor=4), model="Qwen3-32B")
    with pytest.raises(QwenforgeError, match="--rope-factor 2"):
        plan.plan_memory(preset("Qwen2.5-7B-Instruct"), plan.Setup(context=60000), model="Qwen2.5-7B-Instruct")
    with pytest.raises(QwenforgeError, match="from 1 to 4"):
        plan.plan_memory(spec, plan.Setup(context=4096, rope_factor=8), model="Qwen3-32B")


def test_loader_applies_yarn_as_qwen_documents(tiny_qwen3, tmp_path):
    """Loading with --max-context beyond the window equals stock transformers on a config edited as Qwen's model card says."""
    from transformers import AutoModelForCausalLM

    from qwenforge.infer.load import load_model

    lines = []
    loaded = load_model(str(tiny_qwen3), dtype="float32", threads=1, max_context=8192, say=lines.append)
    rope = loaded.model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 2048) and rope["rope_theta"] > 0
    assert loaded.model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    assert loaded.context_limit == 8192 and "YaRN x4 to 8,192 tokens" in lines[0] and "sdpa attention" in lines[0]
    edited = tmp_path / "edited"
    shutil.copytree(tiny_qwen3, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # a hub-style config.json, edited as the card says
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    (edited / "config.json").write_text(json.dumps(config))
    stock = AutoModelForCausalLM.from_pretrained(str(edited), dtype=torch.float32).eval()
    ids = torch.randint(0, 151000, (1, 2200))  # past the native 2,048
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.model(ids).last_hidden_state, stock.model(ids).last_hidden_state)
        unscaled = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float32).eval()
        assert not torch.allclose(unscaled.model(ids).last_hidden_state, stock.model(ids).last_hidden_state, atol=1e-3)
    plain = load_model(str(tiny_qwen3), dtype="float32", threads=1)
    assert plain.model.config.rope_parameters.get("rope_type", "default") == "default" and plain.context_limit == 2048
    with pytest.raises(QwenforgeError, match="beyond 8,192 tokens"):
        load_model(str(tiny_qwen3), dtype="float32", threads=1, max_context=9000)


def test_vllm_gets_yarn_and_attention_is_chosen(monkeypatch):
    import importlib.util

    from qwenforge.infer import load
    from qwenforge.infer.server import vllm_command

    yarn = yarn_scaling(preset("Qwen3-32B"), 131072)
    command = vllm_command("/m", max_context=131072, rope_scaling=yarn)
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert load.attention_implementation("cpu", "float32") == "sdpa"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert load.attention_implementation("cuda", "bfloat16") == "flash_attention_2"
    assert load.attention_implementation("cuda", "float32") == "sdpa"
