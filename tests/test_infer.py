"""The inference loader, prompt building, generation and `qwenforge generate` (tiny models; real model marked slow)."""

from __future__ import annotations

import json

import pytest
import torch

from qwenforge.arch.presets import get_preset
from qwenforge.arch.spec import spec_from_config
from qwenforge.errors import QwenforgeError
from qwenforge.infer.generation import Sampling, build_prompt, check_length, complete, split_reasoning
from qwenforge.infer.load import Hardware, choose_setup, load_model, resolve_source

GIB = 2**30
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _spec(name):
    return spec_from_config(get_preset(name), name)


def test_cpu_choice_follows_the_planner_and_prefers_fp16_decode_on_avx512():
    small = _spec("Qwen2.5-0.5B-Instruct")
    avx512 = Hardware("cpu", "CPU (AVX512)", 20 * GIB, 20 * GIB, fp16_fast=True)
    setup = choose_setup(small, avx512)
    assert (setup.device, setup.dtype, setup.quant) == ("cpu", "float16", "none")
    assert "planner: fp32 fits" in setup.reason and "AVX-512" in setup.reason
    assert choose_setup(small, avx512, batch=8).dtype == "float32"  # fp16 matrix-matrix kernels are slow on CPU
    plain = Hardware("cpu", "CPU (AVX2)", 20 * GIB, 20 * GIB, fp16_fast=False)
    assert choose_setup(small, plain).dtype == "float32"
    exact = choose_setup(small, avx512, dtype="float32")
    assert exact.dtype == "float32" and "--dtype float32" in exact.reason


def test_gpu_choices_bf16_fp16_quantized_and_offload():
    seven = _spec("Qwen2.5-7B-Instruct")
    ampere = Hardware("cuda", "A100", 80 * GIB, 64 * GIB, bf16_fast=True, fp16_fast=True, bitsandbytes=True)
    assert choose_setup(seven, ampere).dtype == "bfloat16"
    turing = Hardware("cuda", "T4", 15 * GIB, 64 * GIB, bf16_fast=False, fp16_fast=True, bitsandbytes=True)
    assert choose_setup(seven, turing).dtype == "float16"
    small_gpu = Hardware("cuda", "small", 8 * GIB, 64 * GIB, bf16_fast=True, fp16_fast=True, bitsandbytes=True)
    squeezed = choose_setup(seven, small_gpu)
    assert squeezed.quant in ("int8", "nf4") and squeezed.device == "cuda"
    without_bnb = Hardware("cuda", "small", 8 * GIB, 64 * GIB, bf16_fast=True, fp16_fast=True, bitsandbytes=False)
    offloaded = choose_setup(seven, without_bnb)
    assert offloaded.device == "auto" and offloaded.quant == "none" and "bitsandbytes" in offloaded.reason
    huge = choose_setup(_spec("Qwen2.5-72B-Instruct"), small_gpu)
    assert huge.device == "auto" and "offloading" in huge.reason
    assert choose_setup(seven, ampere, quant="nf4", device="cuda:1").quant == "nf4"


@pytest.mark.parametrize("option", [{"dtype": "float64"}, {"quant": "gptq"}, {"device": "tpu"}])
def test_bad_overrides_are_user_errors(option):
    with pytest.raises(QwenforgeError, match="choose"):
        choose_setup(_spec("Qwen3-0.6B"), Hardware("cpu", "CPU", 8 * GIB, 8 * GIB), **option)


def test_missing_model_and_bad_files_name_the_fix(tmp_path):
    with pytest.raises(QwenforgeError, match="no such file or folder"):
        resolve_source(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(QwenforgeError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.bin"))
    with pytest.raises(QwenforgeError, match="no config.json or adapter_config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(QwenforgeError, match="--engine"):
        load_model(str(tmp_path), engine="onnx")


def test_embedded_gguf_path_reuses_the_cached_import(embedded_model_dir):
    from qwenforge.cache import embedded_gguf

    source = resolve_source(str(embedded_gguf()))
    assert source["folder"] == embedded_model_dir and source["gguf"] == embedded_gguf()


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    return load_model(str(tiny_qwen3), dtype="float32", threads=1)


def test_prompt_is_the_models_own_template_with_thinking_switch(tiny):
    tokenizer = tiny.tokenizer
    assert build_prompt(tokenizer, QUESTION) == tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    off = build_prompt(tokenizer, QUESTION, enable_thinking=False)
    on = build_prompt(tokenizer, QUESTION, enable_thinking=True)
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")
    with pytest.raises(QwenforgeError, match="bad message"):
        build_prompt(tokenizer, [{"role": "robot", "content": "hi"}])


def test_streamed_reasoning_and_answer_come_apart():
    from qwenforge.infer.generation import reasoning_deltas

    pieces = ["<think>\nThe user", " asks about France", ".\n</think>\n\n", "The capital", " is Paris."]
    text, shown, reasoning, answer = "", (0, 0), "", ""
    for piece in pieces:
        text += piece
        more_reasoning, more_answer, shown = reasoning_deltas(text, shown)
        reasoning, answer = reasoning + more_reasoning, answer + more_answer
    assert (reasoning, answer) == ("The user asks about France.", "The capital is Paris.")


def test_split_reasoning():
    assert split_reasoning("<think>\nweigh it\n</think>\n\nParis.") == ("weigh it", "Paris.")
    assert split_reasoning("Paris.") == ("", "Paris.")
    assert split_reasoning("<think>still thinking") == ("still thinking", "")


def test_greedy_generation_matches_plain_transformers(tiny):
    prompt = build_prompt(tiny.tokenizer, QUESTION)
    pieces = []
    result = complete(tiny, prompt, Sampling(temperature=0, max_new_tokens=12), on_piece=pieces.append)
    inputs = tiny.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        reference = tiny.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = tiny.tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result.text == expected == "".join(pieces)
    assert result.completion_tokens == reference.shape[1] - inputs["input_ids"].shape[1]
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.finish_reason in ("stop", "length") and result.seconds >= result.first_token_seconds > 0


def test_seeded_sampling_repeats(tiny):
    prompt = build_prompt(tiny.tokenizer, QUESTION)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=7)
    first, second = complete(tiny, prompt, sampling), complete(tiny, prompt, sampling)
    other = complete(tiny, prompt, sampling.updated(seed=8))
    assert first.text == second.text and first.text != other.text


def test_too_long_prompt_names_the_limit(tiny):
    with pytest.raises(QwenforgeError, match=f"context limit of {tiny.context_limit} tokens"):
        check_length(tiny, tiny.context_limit - 3, 4)
    with pytest.raises(QwenforgeError, match="settable"):
        Sampling().updated(temprature=1)


def test_peft_adapter_folder_loads_merged_onto_its_base(tiny_qwen3, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_qwen3)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        expected = peft_model(ids).logits
        plain = load_model(str(tiny_qwen3), dtype="float32").model(ids).logits
    loaded = load_model(str(adapter), dtype="float32")
    assert loaded.adapter == adapter and loaded.source == tiny_qwen3 and loaded.name == "adapter"
    with torch.inference_mode():
        got = loaded.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)
    config.pop("base_model_name_or_path")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QwenforgeError, match="--base"):
        load_model(str(adapter))


# --- qwenforge generate -------------------------------------------------------------------


def _prompts(path, count=5):
    lines = [json.dumps({"id": f"q{i}", "prompt": f"Question number {i}: what is {i} + {i}?"}) for i in range(count)]
    lines.append(json.dumps({"id": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batched_left_padded_generation_equals_one_by_one(tiny, tmp_path):
    from qwenforge.infer.generate import generate_file, read_prompts

    source = _prompts(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    sampling = Sampling(temperature=0, max_new_tokens=6)
    summary = generate_file(tiny, source, out, sampling, batch_size=4)
    rows = _rows(out)
    assert [row["id"] for row in rows] == ["q0", "q1", "q2", "q3", "q4", "m"]
    assert summary["generated"] == 6 and summary["skipped"] == 0
    for item, row in zip(read_prompts(source), rows):
        single = complete(tiny, build_prompt(tiny.tokenizer, item["messages"]), sampling)
        assert row["output"] == single.text and row["completion_tokens"] == single.completion_tokens
        assert row["prompt_tokens"] == single.prompt_tokens
    recipe = json.loads((tmp_path / "out.jsonl.recipe.json").read_text())
    assert recipe["batch_size"] == 4 and recipe["sampling"]["max_new_tokens"] == 6 and "qwenforge_version" in recipe


def test_generate_resumes_and_repeats_with_a_seed(tiny, tmp_path):
    from qwenforge.infer.generate import generate_file

    source = _prompts(tmp_path / "in.jsonl")
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3)
    full, again = tmp_path / "full.jsonl", tmp_path / "again.jsonl"
    generate_file(tiny, source, full, sampling, batch_size=2)
    generate_file(tiny, source, again, sampling, batch_size=2)
    assert _rows(full) == _rows(again)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("\n".join(full.read_text().splitlines()[:2]) + "\n" + '{"id": "q2", "outp')  # killed mid-write
    summary = generate_file(tiny, source, resumed, sampling, batch_size=2)
    assert summary["skipped"] == 2 and summary["generated"] == 4
    assert _rows(resumed) == _rows(full)


def test_seeded_sampling_is_per_prompt_so_a_mid_batch_resume_repeats(tiny, tmp_path):
    """Resumed after a torn line in the middle of a batch, every later prompt gets its full run's answer."""
    from qwenforge.infer.generate import generate_file

    source = _prompts(tmp_path / "in.jsonl")
    sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=8, seed=11)
    full = tmp_path / "full.jsonl"
    generate_file(tiny, source, full, sampling, batch_size=2)
    assert len({row["output"] for row in _rows(full)}) > 1  # really sampled, not one fixed answer
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(full.read_text().splitlines()[0] + "\n" + '{"id": "q1", "outp')  # killed mid-batch
    summary = generate_file(tiny, source, resumed, sampling, batch_size=2)
    assert summary["skipped"] == 1 and summary["generated"] == 5
    assert _rows(resumed) == _rows(full)


def test_generate_refuses_outputs_that_would_lose_work(tiny, tmp_path):
    from qwenforge.infer.generate import generate_file

    source = _prompts(tmp_path / "in.jsonl")
    sampling = Sampling(temperature=0, max_new_tokens=2)
    before = source.read_text()
    with pytest.raises(QwenforgeError, match="is the input file too"):
        generate_file(tiny, source, tmp_path / "." / "in.jsonl", sampling)
    assert source.read_text() == before
    (tmp_path / "folder").mkdir()
    with pytest.raises(QwenforgeError, match="is a folder; give a file name for the output file"):
        generate_file(tiny, source, tmp_path / "folder", sampling)
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(QwenforgeError, match="cannot write the output file there"):
        generate_file(tiny, source, tmp_path / "plain-file" / "out.jsonl", sampling)


def test_a_first_prompt_that_fails_leaves_no_empty_output(tiny, tmp_path):
    from qwenforge.infer.generate import generate_file

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "word " * 5000}) + "\n")  # over the context limit
    out = tmp_path / "out.jsonl"
    with pytest.raises(QwenforgeError, match="context limit"):
        generate_file(tiny, source, out, Sampling(temperature=0, max_new_tokens=2))
    assert not out.exists() and not (tmp_path / "out.jsonl.recipe.json").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"id": 1, "messages": []}\n', r"in.jsonl:1: need a \"prompt\" string or a non-empty \"messages\" list"),
        (b'{"id": 1, "messages": [{"role": "user"}]}\n', r"in.jsonl:1: each message needs a role"),
        (b'{"id": [1], "prompt": "x"}\n', r"in.jsonl:1: \"id\" must be a string or an integer"),
        (b'{"id": 1, "prompt": "caf\xe9"}\n', r"in.jsonl: not UTF-8 text \(byte 24 is 0xe9\); save the input file as UTF-8"),
    ],
)
def test_generate_input_shapes_are_one_line(tmp_path, content, match):
    from qwenforge.infer.generate import read_prompts

    (tmp_path / "in.jsonl").write_bytes(content)
    with pytest.raises(QwenforgeError, match=match):
        read_prompts(tmp_path / "in.jsonl")


def test_generate_input_errors_name_file_and_line(tmp_path):
    from qwenforge.infer.generate import read_prompts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2}\n')
    with pytest.raises(QwenforgeError, match=r"bad.jsonl:2: need"):
        read_prompts(bad)
    bad.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(QwenforgeError, match="duplicate id"):
        read_prompts(bad)


def test_generate_cli_end_to_end(tiny_qwen3, tmp_path):
    from typer.testing import CliRunner

    from qwenforge.cli import app

    source = _prompts(tmp_path / "in.jsonl", count=2)
    out = tmp_path / "out.jsonl"
    args = ["generate", str(tiny_qwen3), "-i", str(source), "-o", str(out), "--max-new-tokens", "4", "--json", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["generated"] == 3 and len(_rows(out)) == 3
    again = CliRunner().invoke(app, args)
    assert json.loads(again.stdout)["skipped"] == 3 and len(_rows(out)) == 3
    other = CliRunner().invoke(app, [*args[:-3], "--temperature", "0.5"])
    assert other.exit_code == 2 or isinstance(other.exception, QwenforgeError)
    assert "sampling" in str(other.exception) and "--force" in str(other.exception)
    fresh = CliRunner().invoke(app, [*args, "--force"])
    assert json.loads(fresh.stdout)["skipped"] == 0 and len(_rows(out)) == 3


def test_vllm_engine_builds_its_command_and_explains_when_missing(tiny_qwen3, monkeypatch):
    from rich.console import Console

    from qwenforge.infer import server

    command = server.vllm_command(str(tiny_qwen3), port=9000, api_key="k", served_name="tiny", dtype="bfloat16", tensor_parallel=4, max_context=8192)
    assert command[:3] == ["vllm", "serve", str(tiny_qwen3)]
    text = " ".join(command)
    for flag in ("--host 127.0.0.1", "--port 9000", "--api-key k", "--served-model-name tiny", "--dtype bfloat16", "--tensor-parallel-size 4", "--max-model-len 8192"):
        assert flag in text
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    monkeypatch.setattr(server, "vllm_importable", lambda: False)
    with pytest.raises(QwenforgeError, match="vLLM is not installed.*vllm serve"):
        server.start_server(Console(), str(tiny_qwen3), {"engine": "vllm"}, tensor_parallel=2)


@pytest.mark.slow
def test_embedded_model_answers_paris_with_transformers(embedded_model_dir):
    loaded = load_model("embedded", threads=2)
    result = complete(loaded, build_prompt(loaded.tokenizer, QUESTION), Sampling(temperature=0, max_new_tokens=30))
    assert result.text.strip() == "The capital of France is Paris."
    exact = load_model("embedded", dtype="float32", threads=2)
    assert complete(exact, build_prompt(exact.tokenizer, QUESTION), Sampling(temperature=0, max_new_tokens=30)).text == result.text


@pytest.mark.slow
def test_embedded_model_answers_paris_with_llama_cpp(embedded_model_dir):
    pytest.importorskip("llama_cpp")
    loaded = load_model("embedded", engine="llama.cpp", threads=2)
    result = complete(loaded, build_prompt(loaded.tokenizer, QUESTION), Sampling(temperature=0, max_new_tokens=30))
    assert "Paris" in result.text and result.finish_reason == "stop"
    assert result.text.strip() == "The capital of France is Paris."


def test_cpu_fp16_runs_prompts_through_fp32_and_decodes_in_fp16():
    from qwenforge.infer.load import prompts_in_fp32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).half()
    weight, bias = model[0].weight, model[0].bias
    prompts_in_fp32(model)
    rows = torch.randn(5, 16).half()
    expected = torch.nn.functional.linear(rows.float(), weight.float(), bias.float()).half()
    assert torch.equal(model(rows), expected) and model(rows).dtype == torch.float16
    one = torch.randn(1, 1, 16).half()
    assert torch.equal(model(one), torch.nn.functional.linear(one, weight, bias))
    assert model[0].weight.dtype == torch.float16  # no second copy kept


@pytest.mark.slow
def test_a_gguf_file_is_imported_into_the_cache_once(tmp_path, monkeypatch):
    import shutil

    from qwenforge.cache import embedded_gguf

    gguf = tmp_path / "smol.gguf"
    shutil.copy(embedded_gguf(), gguf)
    monkeypatch.setenv("QWENFORGE_CACHE", str(tmp_path / "cache"))
    source = resolve_source(str(gguf))
    folder = source["folder"]
    assert folder.parent == tmp_path / "cache" / "models" and (folder / "config.json").exists() and source["gguf"] == gguf
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_source(str(gguf))["folder"] == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    loaded = load_model(str(gguf), dtype="float32", threads=2)
    assert loaded.source == folder and loaded.tokenizer.chat_template
