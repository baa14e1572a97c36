"""`qwenforge train` end to end on a tiny model: files written, DPO reference, Ctrl-C + --resume, merge."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from qwenforge.errors import QwenforgeError
from qwenforge.fixtures.tiny import build_tiny_checkpoint
from qwenforge.train.config import config_from_dict
from qwenforge.train.pipeline import Interrupted, train

VOICE = "Picture a bench. Here's the nub: {}. Try it yourself."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, qwen25_tokenizer_dir):
    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("train") / "q2", qwen25_tokenizer_dir, num_hidden_layers=4)


@pytest.fixture(scope="module")
def tiny_curriculum(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    (root / "curriculum.yaml").write_text(
        "topics: [alpha, beta]\nvoice_markers: [Picture, \"Here's the nub\"]\nnegative_patterns: [As an AI]\n"
    )
    for topic in ("alpha", "beta"):
        folder = root / topic
        folder.mkdir()
        with open(folder / "sft.jsonl", "w") as handle:
            for i in range(4):
                answer = VOICE.format(f"{topic} fact {i}")
                handle.write(json.dumps({"messages": [{"role": "user", "content": f"{topic} question {i}?"}, {"role": "assistant", "content": answer}]}) + "\n")
        with open(folder / "dpo.jsonl", "w") as handle:
            for i in range(2):
                handle.write(json.dumps({"prompt": f"{topic} question {i}?", "chosen": VOICE.format(f"{topic} {i}"), "rejected": "As an AI, no."}) + "\n")
        with open(folder / "eval.jsonl", "w") as handle:
            for i in range(2):
                handle.write(json.dumps({"prompt": f"{topic} held out {i}?", "reference": VOICE.format(f"{topic} {i}"), "key_phrases": [topic]}) + "\n")
    return root


def make_config(model, curriculum, out, **extra):
    raw = {
        "model": str(model),
        "curriculum": str(curriculum),
        "output": str(out),
        "sft": {"max_steps": 3, "batch_size": 2, "max_seq_length": 128, "learning_rate": 5e-3, "save_steps": 100},
        "dpo": {"steps": 2, "batch_size": 2, "max_seq_length": 128, "learning_rate": 5e-3},
        "evaluation": {"max_new_tokens": 4},
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_two_topics_end_to_end_then_merge(tmp_path, tiny_model, tiny_curriculum):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenforge.train.merge import merge_run
    from qwenforge.train.zones import adapted_modules

    out = tmp_path / "run"
    logs = []
    result = train(make_config(tiny_model, tiny_curriculum, out), on_log=logs.append)

    topic = out / "topics" / "01-alpha"
    assert sorted(p.name for p in topic.iterdir()) == ["adapter", "eval-before.json", "eval-dpo.json", "eval-sft.json", "sft-adapter", "sft-result.json"]
    assert sorted(p.name for p in (topic / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "metrics.json", "qwenforge-recipe.json"]
    assert {"recipe.json", "summary.json", "metrics.jsonl", "metrics.png"} <= {p.name for p in out.iterdir()}
    assert [t["topic"] for t in result["topics"]] == ["alpha", "beta"]
    for summary in result["topics"]:
        assert summary["sft"]["steps"] == 3 and summary["dpo"]["steps"] == 2
        assert summary["before"]["accuracy"] is not None and summary["after_dpo"]["voice"] is not None

    # DPO's reference is the SFT policy: at DPO's first step policy == reference, so every reward is exactly 0,
    # although SFT moved the adapter away from the base (lora_B is no longer zero).
    first_dpo = [r for r in logs if r["stage"] == "dpo" and r["topic"] == "alpha"][0]
    assert first_dpo["rewards/chosen"] == 0.0 and first_dpo["rewards/margins"] == 0.0
    from safetensors.torch import load_file

    sft_weights = load_file(topic / "sft-adapter" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in sft_weights.items() if "lora_B" in name)
    assert not any(".ref." in name for name in load_file(topic / "adapter" / "adapter_model.safetensors"))

    # The saved adapter is a standard PEFT folder wrapping exactly the zone plan's modules.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out / "topics" / "02-beta" / "adapter"))
    assert adapted_modules(adapted) == {0: ["q_proj"], 1: ["down_proj", "up_proj", "v_proj"], 2: ["down_proj", "up_proj", "v_proj"], 3: ["down_proj", "o_proj", "up_proj"]}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in metrics} >= {"sft", "dpo", "eval-before", "eval-sft", "eval-dpo", "topic-done"}

    # continue mode: the merged checkpoint is base + the last topic's adapter.
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    expected = logits(adapted, ids)
    info = merge_run(out, tmp_path / "merged")
    assert info["adapters"] == [str(out / "topics" / "02-beta" / "adapter")]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists() and (tmp_path / "merged" / "qwenforge-recipe.json").exists()

    with pytest.raises(QwenforgeError, match="already exists; pass --resume"):
        train(make_config(tiny_model, tiny_curriculum, out))


def test_ctrl_c_saves_state_and_resume_finishes(tmp_path, tiny_model, tiny_curriculum):
    out = tmp_path / "run"
    config = make_config(tiny_model, tiny_curriculum, out, dpo={"enabled": False})
    stop = threading.Event()

    def request_stop(record):  # what the Ctrl-C handler does, here during SFT step 2 of the second topic
        if record["topic"] == "beta" and record.get("step") == 1:
            stop.set()

    with pytest.raises(Interrupted, match="stopped during beta SFT at step 2"):
        train(config, stop=stop, on_log=request_stop)
    assert (out / "topics" / "01-alpha" / "adapter" / "metrics.json").exists()
    assert (out / "topics" / "02-beta" / "sft" / "checkpoint-2").is_dir()

    changed = make_config(tiny_model, tiny_curriculum, out, dpo={"enabled": False}, lora={"preset": "aggressive"})
    with pytest.raises(QwenforgeError, match="--resume with a changed 'lora'"):
        train(changed, resume=True)

    resumed_logs = []
    result = train(config, resume=True, on_log=resumed_logs.append)
    assert [r["step"] for r in resumed_logs if r["stage"] == "sft"] == [3]  # only the missing step ran
    assert [t["topic"] for t in result["topics"]] == ["alpha", "beta"]
    assert result["topics"][1]["sft"]["steps"] == 3 and result["topics"][1]["dpo"] is None
    assert not (out / "topics" / "02-beta" / "sft").exists()  # trainer state removed once the topic is done


def test_merge_mode_folds_each_topic_in_order(tmp_path, tiny_model, tiny_curriculum):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwenforge.train.merge import merge_run

    out = tmp_path / "run"
    train(make_config(tiny_model, tiny_curriculum, out, between_topics="merge", dpo={"enabled": False}, sft={"max_steps": 1}))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[7, 8, 9]])
    base_logits = logits(model, ids)
    for name in ("01-alpha", "02-beta"):
        model = PeftModel.from_pretrained(model, str(out / "topics" / name / "adapter")).merge_and_unload()
    info = merge_run(out, tmp_path / "merged")
    assert len(info["adapters"]) == 2
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(merged, ids), base_logits, atol=1e-4)


def test_the_guide_yaml_trains_as_written(tmp_path, tiny_model, tiny_curriculum):
    """The guide's YAML (aliases, warmup steps, accumulation, bf16, checkpointing) on a tiny model, 2 SFT steps."""
    from pathlib import Path

    from qwenforge.train.config import load_config

    guide = Path(__file__).parent / "fixtures" / "guide-train.yaml"
    overrides = {"model": str(tiny_model), "curriculum": str(tiny_curriculum), "output": str(tmp_path / "run"),
                 "sft.max_steps": 2, "dpo.steps": 1, "evaluation.max_new_tokens": 2}
    config = load_config(guide, overrides)
    assert len(config.notices) == 4  # dpo.steps_per_topic is overridden above, so 4 of the 5 aliases are read
    logs = []
    result = train(config, on_log=logs.append)
    sft = [r for r in logs if r["stage"] == "sft" and r["topic"] == "alpha" and "loss" in r]
    assert [r["step"] for r in sft] == [1, 2] and all(math.isfinite(r["loss"]) for r in sft)
    # warmup_steps: 50 on a cosine schedule: the rate climbs from 0 by 2e-4 / 50 per optimizer step
    assert [r["learning_rate"] for r in sft] == pytest.approx([0.0, 2e-4 / 50])
    assert result["topics"][0]["dpo"]["steps"] == 1
    assert (tmp_path / "run" / "topics" / "02-beta" / "adapter" / "adapter_model.safetensors").exists()
