"""An exported GGUF run in llama.cpp itself (the prebuilt engine of the `xllamacpp` extra):
a chat answer through the file's own chat template, and llama.cpp's greedy next token at every
position of a text, to count top-1 agreement with the Hugging Face checkpoint (the real-model
tests and benchmarks/vocab_transplant.py --llama-cpp).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from qwenforge.errors import QwenforgeError


@contextlib.contextmanager
def llama_cpp_server(gguf_path: Path, context: int = 1024, threads: int = 1) -> Iterator[object]:
    """llama.cpp's server, in process, on one GGUF file (no network port is used by the calls here)."""
    try:
        import xllamacpp
    except ImportError as error:
        raise QwenforgeError("running a GGUF in llama.cpp needs its engine: pip install 'qwenforge[xllamacpp]'") from error
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path)
    params.n_ctx = context
    params.n_parallel = 1
    params.warmup = False
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)
    try:
        yield server
    finally:
        del server


def chat_reply(server, question: str, max_tokens: int = 24) -> str:
    """Greedy reply to one user message, formatted by the GGUF's own chat template."""
    result = server.handle_chat_completions(
        {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, "top_k": 1}
    )
    return result["choices"][0]["message"]["content"]


def greedy_next_tokens(server, token_ids: list[int]) -> list[int]:
    """llama.cpp's argmax token after each prefix token_ids[:i], i = 1..len-1 (the prompt cache
    makes each step evaluate one new token)."""
    chosen = []
    for end in range(1, len(token_ids)):
        result = server.handle_completions(
            {"prompt": token_ids[:end], "max_tokens": 1, "temperature": 0, "top_k": 1, "n_probs": 1, "cache_prompt": True}
        )
        chosen.append(result["choices"][0]["logprobs"]["content"][0]["id"])
    return chosen


def hf_greedy(folder: Path, text: str, tokens: int) -> tuple[list[int], list[int]]:
    """(the first `tokens` ids of `text`, the float32 checkpoint's greedy next token after each prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"][:tokens]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()


def exported_agreement(folder: Path, reference: tuple[list[int], list[int]], gguf: Path, export_type: str,
                       threads: int = 1, question: str | None = None) -> dict:
    """Export `folder` to `gguf` and run it in llama.cpp: the share of positions where its greedy next
    token is the checkpoint's (`reference`, from hf_greedy), and its answer to `question`. The GGUF and
    its Modelfile are removed after."""
    from qwenforge.export.gguf import export

    export(folder, gguf, export_type)
    ids, predicted = reference
    try:
        with llama_cpp_server(gguf, context=len(ids) + 64, threads=threads) as server:
            reply = chat_reply(server, question) if question else None
            chosen = greedy_next_tokens(server, ids)
    finally:
        gguf.unlink()
        gguf.with_suffix(".Modelfile").unlink(missing_ok=True)
    return {"top1": sum(a == b for a, b in zip(chosen, predicted)) / len(predicted), "reply": reply}
