"""Prompt building and streaming generation shared by `chat`, `generate` and `serve`.

The prompt is always the model's own chat template (tokenizer.apply_chat_template) rendered to
text here, whatever the engine: engines that template for themselves answered nonsense.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qwenforge.errors import QwenforgeError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# name: (type, lowest, highest, neutral value: the one that changes nothing)
SETTINGS = {
    "temperature": (float, 0.0, 2.0, 1.0),
    "top_p": (float, 0.0, 1.0, 1.0),
    "top_k": (int, -1, 1_000_000, 0),
    "min_p": (float, 0.0, 1.0, 0.0),
    "presence_penalty": (float, -2.0, 2.0, 0.0),
    "frequency_penalty": (float, -2.0, 2.0, 0.0),
    "repetition_penalty": (float, 0.01, 10.0, 1.0),
    "max_new_tokens": (int, 1, 10**9, None),
    "seed": (int, -(2**63), 2**63 - 1, None),
}
MODEL_SETTINGS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# Qwen3 model cards: each mode has its own recommended sampling (greedy makes thinking loop).
QWEN3_PRESETS = {
    True: {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    False: {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}
# Qwen2.5-Instruct's generation_config.json: the default for a model that ships none.
QWEN_INSTRUCT_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; temperature 0 means greedy. None means "the model's default" (see `model_sampling`)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 512
    seed: int | None = None

    def updated(self, **changes) -> "Sampling":
        """A copy with `changes` applied, each checked (used by `/set` and request bodies); "default" clears one."""
        clean = {}
        for key, value in changes.items():
            if key not in SETTINGS:
                raise QwenforgeError(f"unknown setting {key!r}; settable: {', '.join(SETTINGS)}")
            if value is None or value == "default":
                if SETTINGS[key][3] is None and key != "seed":
                    raise QwenforgeError(f"{key} has no model default; give a number")
                clean[key] = None
                continue
            kind, low, high, _ = SETTINGS[key]
            try:
                number = float(value)
                if kind is int and number != int(number):
                    raise ValueError
                number = kind(number)
            except (TypeError, ValueError, OverflowError):
                raise QwenforgeError(f"{key}={value!r}: not {'an integer' if kind is int else 'a number'}") from None
            if not low <= number <= high or (key == "top_p" and number == 0):
                raise QwenforgeError(f"{key}={value}: must be between {low} and {high}" + (" (and above 0)" if key == "top_p" else ""))
            clean[key] = number
        return replace(self, **clean)

    def over(self, defaults: dict) -> "Sampling":
        """Every unset model setting filled from `defaults`, then from the neutral values."""
        filled = {key: defaults.get(key, SETTINGS[key][3]) for key in MODEL_SETTINGS if getattr(self, key) is None}
        return replace(self, **filled)

    def explicit(self) -> dict:
        """The settings given (not left to the model)."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    def to_dict(self) -> dict:
        return asdict(self)


def model_sampling(folder: Path, tokenizer, thinking: bool | None) -> tuple[dict, str]:
    """The model's sampling defaults and where they come from.

    generation_config.json first; a Qwen3 template (thinking switch) then takes its documented
    per-mode preset; a model that ships no sampling values gets Qwen2.5-Instruct's.
    """
    path = Path(folder) / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    values = {key: config[key] for key in MODEL_SETTINGS if config.get(key) is not None}
    origin = "generation_config.json"
    if config.get("do_sample") is False:
        values, origin = {"temperature": 0.0}, "generation_config.json (do_sample false: greedy)"
    elif thinking is not None and supports_thinking(tokenizer):
        values.update(QWEN3_PRESETS[thinking])
        origin = f"Qwen3 {'thinking' if thinking else 'non-thinking'} preset"
    elif not values:
        values, origin = dict(QWEN_INSTRUCT_DEFAULTS), "Qwen2.5-Instruct defaults (the model ships no sampling values)"
    return values, origin


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


def reasons(tokenizer) -> bool:
    """Whether replies may open with a <think> block: Qwen3 (switchable) and QwQ (always; its template opens the block)."""
    return THINK_OPEN in (getattr(tokenizer, "chat_template", None) or "")


SOFT_SWITCH = re.compile(r"(?<![\w/])/(think|no_think)\b")


def soft_switch(text: str) -> str | None:
    """The last of Qwen3's in-message switches in `text` ("/think" or "/no_think"), if any."""
    found = SOFT_SWITCH.findall(text or "")
    return f"/{found[-1]}" if found else None


def thinking_mode(tokenizer, messages: list[dict], enable_thinking: bool | None) -> bool | None:
    """Whether Qwen3 will reason for this conversation (None: the model has no switch).

    `enable_thinking=False` wins (the template then ignores soft switches); otherwise the most recent
    /think or /no_think in a user message decides, as Qwen3 follows the latest instruction; default on.
    """
    if not supports_thinking(tokenizer):
        return None
    if enable_thinking is False:
        return False
    for message in reversed(messages):
        switch = soft_switch(message.get("content")) if message.get("role") == "user" and isinstance(message.get("content"), str) else None
        if switch:
            return switch == "/think"
    return True


def resolve_sampling(loaded, sampling: Sampling, thinking: bool | None) -> tuple[Sampling, str]:
    """`sampling` with every unset value taken from the model (for this thinking mode), and where those came from."""
    defaults, origin = model_sampling(loaded.source, loaded.tokenizer, thinking)
    return sampling.over(defaults), origin


def build_prompt(tokenizer, messages: list[dict], enable_thinking: bool | None = None, tools: list[dict] | None = None) -> str:
    """The prompt text for `messages` (and `tools`) through the model's own chat template, ready for the answer."""
    from qwenforge.infer.tools import renders_tools, template_messages

    for message in messages:
        calls = isinstance(message, dict) and message.get("role") == "assistant" and message.get("tool_calls")
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool") or not (
            isinstance(message.get("content"), str) or (calls and message.get("content") is None)
        ):
            raise QwenforgeError(f"bad message {message!r}: need {{'role': system|user|assistant|tool, 'content': str}}")
    kwargs = {}
    if enable_thinking is not None and supports_thinking(tokenizer):
        kwargs["enable_thinking"] = enable_thinking
    if tools:
        if not renders_tools(tokenizer):
            raise QwenforgeError("this model's chat template has no tools section; tool calling needs a template that renders tools (Qwen2.5, QwQ, Qwen3)")
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(template_messages(messages), tokenize=False, add_generation_prompt=True, **kwargs)


def opened_reasoning(prompt: str) -> str:
    """"<think>" when the prompt itself opens the reasoning block (QwQ's template does), to prepend to the reply."""
    return THINK_OPEN if prompt.rstrip().endswith(THINK_OPEN) else ""


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a Qwen3-style reply; reasoning is '' when there is no <think> block."""
    if THINK_CLOSE in text:
        head, answer = text.split(THINK_CLOSE, 1)
        return head.replace(THINK_OPEN, "", 1).strip(), answer.lstrip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip(), ""
    return "", text


def reasoning_deltas(text: str, shown: tuple[int, int], final: bool = False) -> tuple[str, str, tuple[int, int]]:
    """What is new in the reasoning and the answer of a growing reply, given the lengths already shown.

    A tag arriving in pieces ("</thi") is held back until it is whole, or until `final`.
    """
    if not final:
        for tag in (THINK_CLOSE, THINK_OPEN):
            partial = next((size for size in range(len(tag) - 1, 0, -1) if text.endswith(tag[:size])), 0)
            if partial:
                text = text[:-partial]
                break
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


def _generation_kwargs(sampling: Sampling, tokenizer, prompt_length: int) -> dict:
    """`model.generate` arguments for `sampling`: every value explicit, so the model's generation_config cannot add its own."""
    sampling = sampling.over({})
    kwargs = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    kwargs["repetition_penalty"] = sampling.repetition_penalty
    if sampling.presence_penalty or sampling.frequency_penalty:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([OpenAIPenalties(sampling.presence_penalty, sampling.frequency_penalty, prompt_length)])
    if sampling.temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else None,
            min_p=sampling.min_p or None,
        )
    return kwargs


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties, which transformers lacks (a LogitsProcessor).

    As in vLLM: each token already generated (not the prompt) loses presence + frequency x count.
    """

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def sampling_processors(sampling: Sampling, prompt_length: int):
    """The logits processors `model.generate` applies for `sampling`, in its order (for engines that hand us logits)."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    sampling = sampling.over({})
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.presence_penalty or sampling.frequency_penalty:
        processors.append(OpenAIPenalties(sampling.presence_penalty, sampling.frequency_penalty, prompt_length))
    if sampling.temperature not in (0, 1.0):
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.temperature != 0:
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        if sampling.min_p:
            processors.append(MinPLogitsWarper(sampling.min_p))
    return processors


def next_token(processors, ids, logits, sampling: Sampling, generator) -> int:
    """One token from one row of logits (torch): greedy at temperature 0, else a draw after `processors`."""
    import torch

    scores = processors(ids, logits)
    if sampling.temperature == 0:
        return int(scores.argmax(-1))
    return int(torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=generator))


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
                    **_generation_kwargs(sampling, tokenizer, prompt_tokens),
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


def _stream_llama_cpp(loaded, prompt: str, sampling: Sampling, stop: threading.Event):
    """llama.cpp evaluates the token ids of our own rendered prompt; we pick tokens and decode text.

    llama-cpp-python's own `generate()` spent ~6 s before its first token here (llama.eval of the
    same prompt: 0.4 s), so the loop is written out: eval, pick, eval.
    """
    import numpy as np
    import torch

    tokenizer, llama = loaded.tokenizer, loaded.llama
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    check_length(loaded, len(ids), sampling.max_new_tokens)
    eos = {tokenizer.eos_token_id, llama.token_eos()}
    processors = sampling_processors(sampling, len(ids))
    generator = torch.Generator()
    generator.manual_seed(sampling.seed) if sampling.seed is not None else generator.seed()
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
        row = torch.from_numpy(logits.astype(np.float32))[None]
        token = next_token(processors, torch.tensor([ids + out]), row, sampling, generator)
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
