"""Decode speed and time to first token: qwenforge's default path vs plain transformers, same weights, one run.

    python benchmarks/infer_speed.py                    # embedded Qwen2.5-Coder-0.5B-Instruct, 1 thread
    python benchmarks/infer_speed.py --server --memory-requests 200

Baseline: `AutoModelForCausalLM.from_pretrained(folder)` + `generate()` with default settings
(fp32, greedy from the model's generation config). qwenforge: `load_model(MODEL)` (the loader's
choice for this machine) + `complete()`; optionally the llama.cpp engine on the same GGUF weights.
Fidelity: greedy tokens of each path against the fp32 baseline on several prompts.
Server: requests/s of 8 concurrent clients against the same requests one after another, and the
server's resident memory across N requests.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
]


def plain_transformers(folder: Path, prompts, max_new_tokens: int):
    """The baseline a person would write: default dtype, default generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    outputs, first_times, decode_rates = [], [], []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1)
        first_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - started
        new = ids[0, inputs["input_ids"].shape[1] :].tolist()
        outputs.append(new)
        decode_rates.append((len(new) - 1, max(seconds - first_times[-1], 1e-9)))
    del model
    torch.set_num_threads(torch.get_num_threads())
    return {"dtype": "float32", "outputs": outputs, "first_token_s": first_times, "decode_tokens_per_s": decode_rates}


def qwenforge_path(model: str, prompts, max_new_tokens: int, engine: str, threads: int, dtype: str | None = None):
    from qwenforge.infer.generation import Sampling, build_prompt, complete
    from qwenforge.infer.load import load_model

    loaded = load_model(model, engine=engine, threads=threads, dtype=dtype)
    outputs, first_times, decode_rates = [], [], []
    for prompt in prompts:
        text_prompt = build_prompt(loaded.tokenizer, [{"role": "user", "content": prompt}])
        result = complete(loaded, text_prompt, Sampling(temperature=0, max_new_tokens=max_new_tokens))
        outputs.append(loaded.tokenizer(result.text, add_special_tokens=False)["input_ids"])
        first_times.append(result.first_token_seconds)
        decode_rates.append((result.completion_tokens - 1, result.seconds - result.first_token_seconds))
    if loaded.llama is not None:
        loaded.llama.close()
    return {"setup": loaded.describe(), "dtype": loaded.setup.dtype, "outputs": outputs, "first_token_s": first_times, "decode_tokens_per_s": decode_rates}


def _rate(pairs) -> float:
    """Decode tokens/s over all prompts: tokens after the first, over the time they took."""
    return sum(tokens for tokens, _ in pairs) / sum(seconds for _, seconds in pairs)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Identical answers, and mean tokens matched before the first difference (compared on text tokens)."""
    prefix = []
    for ref, out in zip(reference, other):
        n = 0
        while n < min(len(ref), len(out)) and ref[n] == out[n]:
            n += 1
        prefix.append(n / max(len(ref), 1))
    identical = sum(ref == out for ref, out in zip(reference, other))
    return {"identical_answers": f"{identical}/{len(reference)}", "mean_matched_prefix": round(statistics.mean(prefix), 3)}


def _retokenized(folder: Path, outputs: list[list[int]]) -> list[list[int]]:
    """Baseline ids up to EOS, re-tokenized from text the way the other paths report theirs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = []
    for ids in outputs:
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        texts.append(tokenizer(tokenizer.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"])
    return texts


def server_figures(model: str, threads: int, requests: int, memory_requests: int) -> dict:
    """Requests/s sequential vs 8 concurrent clients, and RSS drift over `memory_requests` requests."""
    import tempfile

    import openai

    if model == "tiny":
        from qwenforge.cache import cache_root
        from qwenforge.fixtures.tiny import build_tiny_checkpoint
        from qwenforge.fixtures.tokenizers import tokenizer_folder

        model = str(build_tiny_checkpoint("qwen3", Path(tempfile.mkdtemp()) / "tiny-qwen3", tokenizer_folder("qwen3", cache_root())))

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "qwenforge"), "serve", model, "--port", str(port), "--served-name", "m", "--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)

        def ask(i):
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=16, temperature=0)
            return reply.choices[0].finish_reason is not None and reply.usage.completion_tokens > 0

        ask(0)
        started = time.perf_counter()
        sequential_ok = [ask(i) for i in range(requests)]
        sequential = requests / (time.perf_counter() - started)
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            concurrent_ok = list(pool.map(ask, range(requests)))
        concurrent = requests / (time.perf_counter() - started)
        figures = {
            "requests": requests,
            "sequential_requests_per_s": round(sequential, 3),
            "concurrent8_requests_per_s": round(concurrent, 3),
            "ratio": round(concurrent / sequential, 2),
            "all_complete": all(sequential_ok) and all(concurrent_ok),
        }
        if memory_requests:
            def rss():
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(ask, range(16)))  # warm every code path first
            before = rss()
            samples = []
            for start in range(0, memory_requests, 50):
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(ask, range(start, min(start + 50, memory_requests))))
                samples.append(rss())
            figures["memory"] = {
                "requests": memory_requests,
                "rss_before_mib": round(before / 2**20, 1),
                "rss_every_50_mib": [round(s / 2**20, 1) for s in samples],
                "growth_mib": round((samples[-1] - before) / 2**20, 1),
            }
        return figures
    finally:
        process.terminate()
        process.wait(timeout=30)


def _show(name: str, figures: dict) -> None:
    """Each figure as soon as it exists (a slow, shared machine may stop a long run)."""
    print(json.dumps({name: figures}), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=1, help="torch/llama.cpp threads for every path (same for all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--server", action="store_true", help="also measure the server")
    parser.add_argument("--server-requests", type=int, default=16)
    parser.add_argument("--memory-requests", type=int, default=0)
    parser.add_argument("--server-model", default=None, help="model for the server figures (default: --model); 'tiny' builds a tiny Qwen3")
    parser.add_argument("--no-speed", action="store_true", help="server figures only")
    args = parser.parse_args()

    import torch

    from qwenforge.infer.load import resolve_source

    torch.set_num_threads(args.threads)
    folder = Path(resolve_source(args.model)["folder"])
    prompts = PROMPTS[: args.prompts]
    report = {"model": str(folder), "threads": args.threads, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts)}
    if args.no_speed:
        report["server"] = server_figures(args.server_model or args.model, args.threads, args.server_requests, args.memory_requests)
        print(json.dumps(report, indent=2), flush=True)
        return
    baseline = plain_transformers(folder, prompts, args.max_new_tokens)
    reference = _retokenized(folder, baseline["outputs"])
    paths = {"qwenforge default": qwenforge_path(args.model, prompts, args.max_new_tokens, "transformers", args.threads)}
    paths["qwenforge --dtype float32"] = qwenforge_path(args.model, prompts, args.max_new_tokens, "transformers", args.threads, dtype="float32")
    if not args.no_llama_cpp:
        try:
            paths["qwenforge --engine llama.cpp"] = qwenforge_path(args.model, prompts, args.max_new_tokens, "llama.cpp", args.threads)
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            report["llama.cpp"] = f"not measured: {error}"
    base_decode = _rate(baseline["decode_tokens_per_s"])
    base_first = statistics.median(baseline["first_token_s"])
    report["plain transformers"] = {"dtype": "float32", "decode_tokens_per_s": round(base_decode, 2), "first_token_s": round(base_first, 3)}
    _show("plain transformers", report["plain transformers"])
    for name, path in paths.items():
        decode = _rate(path["decode_tokens_per_s"])
        first = statistics.median(path["first_token_s"])
        report[name] = {
            "setup": path["setup"],
            "decode_tokens_per_s": round(decode, 2),
            "decode_speedup": round(decode / base_decode, 2),
            "first_token_s": round(first, 3),
            "first_token_ratio": round(base_first / first, 2),
            "greedy_fidelity_vs_fp32": agreement(reference, path["outputs"]),
        }
        _show(name, report[name])
    if args.server:
        report["server"] = server_figures(args.server_model or args.model, args.threads, args.server_requests, args.memory_requests)
        _show("server", report["server"])
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
