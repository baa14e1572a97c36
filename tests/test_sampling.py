"""Sampling as Qwen documents it: the model's defaults, Qwen3's per-mode presets, soft switches, penalties."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qwenforge.errors import QwenforgeError
from qwenforge.infer.generation import (
    QWEN3_PRESETS,
    OpenAIPenalties,
    Sampling,
    build_prompt,
    complete,
    model_sampling,
    next_token,
    opened_reasoning,
    reasoning_deltas,
    reasons,
    resolve_sampling,
    sampling_processors,
    split_reasoning,
    thinking_mode,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    from qwenforge.infer.load import load_model

    return load_model(str(tiny_qwen3), dtype="float32", threads=1)


@pytest.fixture(scope="module")
def tokenizers(qwen25_tokenizer_dir, qwen3_tokenizer_dir):
    from qwenforge.infer.load import load_tokenizer

    return {"qwen2.5": load_tokenizer(qwen25_tokenizer_dir), "qwen3": load_tokenizer(qwen3_tokenizer_dir)}


def test_settings_are_checked_and_default_follows_the_model():
    sampling = Sampling().updated(temperature="0.5", top_k="40", min_p=0.05, presence_penalty=1.5, repetition_penalty=1.05)
    assert sampling.explicit() == {"temperature": 0.5, "top_k": 40, "min_p": 0.05, "presence_penalty": 1.5, "repetition_penalty": 1.05, "max_new_tokens": 512}
    assert sampling.updated(top_k="default").top_k is None
    for bad, message in [({"top_k": 2.5}, "integer"), ({"min_p": 2}, "between"), ({"presence_penalty": 3}, "between"), ({"top_p": 0}, "above 0"), ({"temperature": "hot"}, "number")]:
        with pytest.raises(QwenforgeError, match=message):
            Sampling().updated(**bad)
    with pytest.raises(QwenforgeError, match="no model default"):
        Sampling().updated(max_new_tokens="default")
    filled = Sampling(temperature=0.2).over({"temperature": 0.9, "top_k": 20})
    assert (filled.temperature, filled.top_k, filled.top_p, filled.min_p, filled.repetition_penalty) == (0.2, 20, 1.0, 0.0, 1.0)


def test_model_defaults_come_from_generation_config_then_qwen3_presets(tmp_path, tokenizers):
    qwen25, qwen3 = tokenizers["qwen2.5"], tokenizers["qwen3"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}))
    assert model_sampling(tmp_path, qwen25, None) == ({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}, "generation_config.json")
    thinking, origin = model_sampling(tmp_path, qwen3, True)
    assert thinking == {**{"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}, "repetition_penalty": 1.1} and origin == "Qwen3 thinking preset"
    plain, origin = model_sampling(tmp_path, qwen3, False)
    assert (plain["temperature"], plain["top_p"], plain["top_k"], plain["min_p"]) == (0.7, 0.8, 20, 0.0) and origin == "Qwen3 non-thinking preset"
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 2048}))  # a base model
    assert model_sampling(tmp_path, qwen25, None)[0] == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))  # a GGUF import: no sampling values
    values, origin = model_sampling(tmp_path, qwen25, None)
    assert values == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05} and "ships no sampling" in origin


def test_soft_switches_decide_the_mode_and_the_preset(tiny, tokenizers):
    qwen3 = tokenizers["qwen3"]
    turns = [{"role": "user", "content": "Think hard /think"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "/no_think What is 2+2?"}]
    assert thinking_mode(qwen3, turns, None) is False  # the latest switch wins
    assert thinking_mode(qwen3, turns[:1], None) is True and thinking_mode(qwen3, QUESTION, None) is True
    assert thinking_mode(qwen3, turns[:1], False) is False  # enable_thinking=False: the template ignores soft switches
    assert thinking_mode(qwen3, [{"role": "user", "content": "see http://x/no_think"}], None) is True
    assert thinking_mode(tokenizers["qwen2.5"], turns, None) is None
    assert "/no_think What is 2+2?" in build_prompt(qwen3, turns)  # passed through to the model as typed
    resolved, origin = resolve_sampling(tiny, Sampling(top_k=5), thinking_mode(qwen3, turns, None))
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.7, 0.8, 5) and origin == "Qwen3 non-thinking preset"
    assert resolve_sampling(tiny, Sampling(), True)[0].temperature == QWEN3_PRESETS[True]["temperature"]


def test_qwq_reasoning_splits_like_qwen3(tokenizers, qwen25_tokenizer_dir, tmp_path):
    """QwQ's template opens <think> itself and has no switch: its replies are split, its sampling is not switched."""
    from qwenforge.infer.load import load_tokenizer

    folder = tmp_path / "qwq"
    shutil.copytree(qwen25_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = tokenizers["qwen2.5"].chat_template
    config["chat_template"] = template.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert config["chat_template"] != template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    qwq = load_tokenizer(folder)
    assert build_prompt(qwq, QUESTION).endswith("<|im_start|>assistant\n<think>\n")
    assert reasons(qwq) and reasons(tokenizers["qwen3"]) and not reasons(tokenizers["qwen2.5"])
    assert thinking_mode(qwq, QUESTION, None) is None
    prompt = build_prompt(qwq, QUESTION)
    assert split_reasoning(opened_reasoning(prompt) + "Weigh it.\n</think>\n\nParis.") == ("Weigh it.", "Paris.")
    text, shown, reasoning, answer = opened_reasoning(prompt), (0, 0), "", ""
    for piece in ["Weigh", " it.\n</th", "ink>\n\nPar", "is <"]:  # tags may arrive in pieces
        text += piece
        more_reasoning, more_answer, shown = reasoning_deltas(text, shown)
        reasoning, answer = reasoning + more_reasoning, answer + more_answer
    assert (reasoning, answer) == ("Weigh it.", "Paris ")
    assert reasoning_deltas(text, shown, final=True)[1] == "<"


def test_presence_and_frequency_penalties_touch_generated_tokens_only():
    ids = torch.tensor([[5, 6, 7, 7, 8]])  # prompt 5, 6; generated 7, 7, 8
    scores = torch.zeros(1, 10)
    out = OpenAIPenalties(presence=1.5, frequency=0.5, prompt_length=2)(ids, scores)
    assert out[0, 7] == pytest.approx(-1.5 - 1.0) and out[0, 8] == pytest.approx(-2.0)
    assert out[0, 5] == 0 and out[0, 6] == 0 and out[0, 9] == 0


def test_processors_for_logits_engines_follow_transformers_order_and_limits():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, -5.0]])
    ids = torch.tensor([[1, 2]])
    generator = torch.Generator().manual_seed(0)
    top1 = Sampling(temperature=1.5, top_k=1)
    assert {next_token(sampling_processors(top1, 1), ids, logits, top1, generator) for _ in range(20)} == {1}
    greedy = Sampling(temperature=0, presence_penalty=2.0)
    assert next_token(sampling_processors(greedy, 1), ids, logits, greedy, generator) == 1  # token 2 was generated: penalised
    assert next_token(sampling_processors(greedy, 2), ids, logits, greedy, generator) == 1
    assert next_token(sampling_processors(Sampling(temperature=0), 1), torch.tensor([[1]]), logits, Sampling(temperature=0), generator) == 1
    min_p = Sampling(temperature=1.0, min_p=0.5)
    assert {next_token(sampling_processors(min_p, 1), ids, logits, min_p, generator) for _ in range(40)} <= {1, 2}
    names = [type(p).__name__ for p in sampling_processors(Sampling(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.1, presence_penalty=1), 1)]
    assert names == ["RepetitionPenaltyLogitsProcessor", "OpenAIPenalties", "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]


def test_top_k_reaches_transformers_generate(tiny):
    """top_k=1 sampling is greedy: proves the value is passed, not overridden by the model's generation_config."""
    prompt = build_prompt(tiny.tokenizer, QUESTION)
    greedy = complete(tiny, prompt, Sampling(temperature=0, max_new_tokens=8)).text
    assert complete(tiny, prompt, Sampling(temperature=1.5, top_k=1, max_new_tokens=8, seed=1)).text == greedy
    wide = {complete(tiny, prompt, Sampling(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=8, seed=seed)).text for seed in range(3)}
    assert len(wide) > 1  # without top_k the tiny random model's draws differ
    penalised = complete(tiny, prompt, Sampling(temperature=0, max_new_tokens=8, presence_penalty=2.0, frequency_penalty=2.0))
    assert penalised.completion_tokens >= 1


def test_server_requests_default_to_the_models_sampling(tiny):
    from qwenforge.infer.server import ApiError, request_sampling

    thinking = request_sampling(tiny, {}, 10, True)
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (0.6, 0.95, 20, 0.0)
    plain = request_sampling(tiny, {"temperature": 0.3, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.05, "presence_penalty": 1.5}, 10, False)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p, plain.repetition_penalty, plain.presence_penalty) == (0.3, 0.8, 5, 0.1, 1.05, 1.5)
    for bad in ({"top_k": "x"}, {"top_k": 2.5}, {"min_p": 1.5}, {"presence_penalty": 5}, {"repetition_penalty": 0}):
        with pytest.raises(ApiError) as error:
            request_sampling(tiny, bad, 10)
        assert error.value.status == 400 and error.value.param == next(iter(bad))
