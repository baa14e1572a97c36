"""Prompt building and streaming generation shared by `chat`, `generate` and `serve`.

The prompt is always the model's own chat template (tokenizer.apply_chat_template) rendered to
text here, whatever the engine: engines that template for themselves answered nonsense.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

from qwenforge.errors import QwenforgeError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 512
    seed: int | None = None

    def updated(self, **changes) -> "Sampling":
        """A copy with `changes` applied, each checked (used by `/set` and request bodies)."""
        clean = {}
        for key, value in changes.items():
            if key not in ("temperature", "top_p", "max_new_tokens", "seed"):
                raise QwenforgeError(f"unknown setting {key!r}; settable: temperature, top_p, max_new_tokens, seed")
            try:
                clean[key] = int(value) if key in ("max_new_tokens", "seed") else float(value)
            except (TypeError, ValueError):
                raise QwenforgeError(f"{key}={value!r}: not a number") from None
        merged = replace(self, **clean)
        if merged.temperature < 0 or not 0 < merged.top_p <= 1 or merged.max_new_tokens < 1:
            raise QwenforgeError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
        return merged

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    """One finished generation with the figures every verb reports."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    seconds: float
    first_token_seconds: float

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


def supports_thinking(tokenizer) -> bool:
    """Whether the chat template switches reasoning with `enable_thinking` (Qwen3)."""
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def build_prompt(tokenizer, messages: list[dict], enable_thinking: bool | None = None) -> str:
    """The prompt text for `messages` through the model's own chat template, ready for the answer."""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(
            message.get("content"), str
        ):
            raise QwenforgeError(f"bad message {message!r}: need {{'role': system|user|assistant|tool, 'content': str}}")
    kwargs = {}
    if enable_thinking is not None and supports_thinking(tokenizer):
        kwargs["enable_thinking"] = enable_thinking
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a Qwen3-style reply; reasoning is '' when there is no <think> block."""
    if THINK_CLOSE in text:
        head, answer = text.split(THINK_CLOSE, 1)
        return head.replace(THINK_OPEN, "", 1).strip(), answer.lstrip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip(), ""
    return "", text


def reasoning_deltas(text: str, shown: tuple[int, int]) -> tuple[str, str, tuple[int, int]]:
    """What is new in the reasoning and the answer of a growing reply, given the lengths already shown."""
    reasoning, answer = split_reasoning(text)
    return reasoning[shown[0] :], answer[shown[1] :], (max(shown[0], len(reasoning)), max(shown[1], len(answer)))


def count_tokens(loaded, text: str) -> int:
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(loaded, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that cannot fit, naming the limit (the server turns this into a 400)."""
    limit = loaded.context_limit
    if prompt_tokens + max_new_tokens > limit:
        raise QwenforgeError(
            f"prompt of {prompt_tokens} tokens plus max_tokens {max_new_tokens} exceeds this model's context limit of {limit} tokens;"
            " shorten the prompt or lower max_tokens"
        )


def stream(loaded, prompt: str, sampling: Sampling, stop: threading.Event | None = None) -> Iterator[str]:
    """Yield the answer's text piece by piece; returns a `Result` as the generator's value.

    Setting `stop` ends the generation at the next token (Ctrl-C in chat, a client that left).
    """
    stop = stop or threading.Event()
    if loaded.engine == "llama.cpp":
        return (yield from _stream_llama_cpp(loaded, prompt, sampling, stop))
    return (yield from _stream_transformers(loaded, prompt, sampling, stop))


def complete(loaded, prompt: str, sampling: Sampling, stop: threading.Event | None = None, on_piece=None) -> Result:
    """Run `stream` to the end and return its Result (`on_piece(text)` sees each piece)."""
    pieces = stream(loaded, prompt, sampling, stop)
    while True:
        try:
            piece = next(pieces)
        except StopIteration as done:
            return done.value
        if on_piece:
            on_piece(piece)


def _generation_kwargs(sampling: Sampling, tokenizer) -> dict:
    kwargs = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sampling.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    return kwargs


class _StopOnEvent:
    """A transformers StoppingCriteria that ends generation when a threading.Event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _stream_transformers(loaded, prompt: str, sampling: Sampling, stop: threading.Event):
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    check_length(loaded, prompt_tokens, sampling.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generated = {}

    def work():
        try:
            with torch.inference_mode():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                generated["ids"] = model.generate(
                    **inputs,
                    **_generation_kwargs(sampling, tokenizer),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                )
        except BaseException as error:  # surfaced in the consuming thread
            generated["error"] = error
            streamer.end()

    started = time.perf_counter()
    first = None
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = []
    finished = False
    try:
        for piece in streamer:
            if piece:
                if first is None:
                    first = time.perf_counter() - started
                text.append(piece)
                yield piece
        finished = True
    finally:
        if not finished:  # the consumer left early (Ctrl-C, closed connection): free the model now
            stop.set()
        thread.join()
    if "error" in generated:
        raise generated["error"]
    new_ids = generated["ids"][0, prompt_tokens:]
    eos = _eos_ids(loaded)
    completion = int(new_ids.shape[0])
    if stop.is_set():
        reason = "cancelled"
    elif completion and int(new_ids[-1]) in eos:
        reason = "stop"
    else:
        reason = "length" if completion >= sampling.max_new_tokens else "stop"
    seconds = time.perf_counter() - started
    return Result("".join(text), prompt_tokens, completion, reason, seconds, first if first is not None else seconds)


def _eos_ids(loaded) -> set[int]:
    eos = getattr(loaded.model, "generation_config", None) and loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    return ids


def _next_token(logits, sampling: Sampling, rng) -> int:
    """Greedy, or temperature + top-p sampling over one row of logits (numpy)."""
    import numpy as np

    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / sampling.temperature
    probabilities = np.exp(scaled)
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities)
    cumulative = np.cumsum(probabilities[order])
    keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
    kept = probabilities[keep] / probabilities[keep].sum()
    return int(rng.choice(keep, p=kept))


def _stream_llama_cpp(loaded, prompt: str, sampling: Sampling, stop: threading.Event):
    """llama.cpp evaluates the token ids of our own rendered prompt; we pick tokens and decode text.

    llama-cpp-python's own `generate()` spent ~6 s before its first token here (llama.eval of the
    same prompt: 0.4 s), so the loop is written out: eval, pick, eval.
    """
    import numpy as np

    tokenizer, llama = loaded.tokenizer, loaded.llama
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    check_length(loaded, len(ids), sampling.max_new_tokens)
    eos = {tokenizer.eos_token_id, llama.token_eos()}
    rng = np.random.default_rng(sampling.seed)
    started = time.perf_counter()
    first = None
    out: list[int] = []
    shown = ""
    reason = "length"
    llama.reset()
    llama.eval(ids)
    while len(out) < sampling.max_new_tokens:
        if stop.is_set():
            reason = "cancelled"
            break
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))  # the last evaluated token's
        token = _next_token(logits.astype(np.float32), sampling, rng)
        if first is None:
            first = time.perf_counter() - started
        if token in eos:
            reason = "stop"
            break
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
        llama.eval([token])
    text = tokenizer.decode(out, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown) :]
    seconds = time.perf_counter() - started
    return Result(text, len(ids), len(out) + (1 if reason == "stop" else 0), reason, seconds, first if first is not None else seconds)
