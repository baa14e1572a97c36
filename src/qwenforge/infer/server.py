"""`qwenforge serve MODEL`: an OpenAI-compatible HTTP server on the transformers or llama.cpp path.

    qwenforge serve embedded --port 8000 --api-key secret
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")

Routes: /v1/chat/completions and /v1/completions (plain and server-sent events), /v1/models,
/health. One generation runs at a time (a CPU has no spare compute to share); other requests
wait their turn in arrival order. A streaming client that disconnects stops its generation at the
next token and frees the slot. Errors are OpenAI-shaped JSON. `--engine vllm` hands the model to
vLLM's own server instead (GPUs, tensor parallelism).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from qwenforge.errors import QwenforgeError
from qwenforge.infer.generation import (
    MODEL_SETTINGS,
    SETTINGS,
    Sampling,
    build_prompt,
    check_length,
    complete,
    count_tokens,
    opened_reasoning,
    reasoning_deltas,
    reasons,
    resolve_sampling,
    split_reasoning,
    thinking_mode,
)
from qwenforge.infer.tools import ToolCallStream, check_tools, forced_prefix, parse_tool_calls, tool_names


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be a{'n integer' if integer else ' number'}, got {value!r}", param=key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", param=key)
    return value


def _flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def _object(body: dict, key: str) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{key}' must be an object, got {value!r}", param=key)
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise ApiError(400, f"messages[{index}] needs a role of system, user, assistant or tool", param=f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            content = "".join(texts) if all(isinstance(text, str) for text in texts) else None
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise ApiError(400, f"messages[{index}].tool_calls must be a list", param=f"messages[{index}].tool_calls")
        if not isinstance(content, str) and not (calls and content is None):
            raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts", param=f"messages[{index}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        kept = {key: message[key] for key in ("tool_calls", "tool_call_id", "name") if message.get(key) is not None and role in ("assistant", "tool")}
        clean.append({"role": role, "content": content, **kept})
    return clean


def _tools(body: dict) -> tuple[list[dict] | None, str]:
    """The request's tools (None when absent or tool_choice is "none") and the reply start tool_choice forces."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools or choice == "none":
        return None, ""
    try:
        tools = check_tools(tools)
        return tools, forced_prefix(choice, tools)
    except QwenforgeError as error:
        raise ApiError(400, str(error), param="tool_choice" if "tool_choice" in str(error) else "tools") from None


def request_sampling(loaded, body: dict, prompt_tokens: int, thinking: bool | None = None) -> Sampling:
    """The request's sampling; what it leaves out follows the model (generation_config.json, Qwen3's per-mode preset).

    top_k, min_p and repetition_penalty are not OpenAI fields: clients send them as extra body fields, as vLLM reads them.
    """
    limit = loaded.context_limit
    room = limit - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context limit is {limit} tokens", param="messages", code="context_length_exceeded")
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": requested}, "max_tokens", min(512, room), 1, 10**9, integer=True)
    try:
        check_length(loaded, prompt_tokens, max_tokens)
    except QwenforgeError as error:
        raise ApiError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
    given = {}
    for key in (*MODEL_SETTINGS, "seed"):
        kind, low, high, _ = SETTINGS[key]
        value = _number(body, key, None, low, high, integer=kind is int)
        if value is not None and not (key == "top_p" and value == 0):  # top_p 0 (no token at all) is read as unset
            given[key] = kind(value)
    return resolve_sampling(loaded, Sampling(max_new_tokens=max_tokens, **given), thinking)[0]


MAX_REQUEST_BYTES = 4 * 2**20  # a chat request is kilobytes; a bigger body is refused before it is read


def build_app(loaded, api_key: str | None = None, served_name: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES):
    """The FastAPI application serving `loaded` under the model id `served_name`.

    Bodies over `max_request_bytes` get 413 unread; templating and tokenizing a request run in a
    worker thread like generation, so the event loop (and /health) never waits on a big prompt.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    name = served_name or loaded.name
    app = FastAPI(title="qwenforge", docs_url=None, redoc_url=None)
    slot = asyncio.Lock()  # one generation at a time; waiters queue in arrival order
    created = int(time.time())
    thinking_possible = reasons(loaded.tokenizer)
    app.state.stats = {"requests": 0, "cancelled": 0}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
            error = ApiError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        too_big = ApiError(413, f"request body over {max_request_bytes} bytes; send a shorter prompt (the server's --max-request-bytes)", code="request_too_large")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise too_big
        raw, size = [], 0
        async for chunk in request.stream():  # also bounds a chunked body that declares no length
            size += len(chunk)
            if size > max_request_bytes:
                raise too_big
            raw.append(chunk)
        try:
            body = json.loads(b"".join(raw))
        except ValueError as error:
            raise ApiError(400, f"request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required (a string)", param="model")
        if model != name:
            raise ApiError(404, f"The model '{model}' does not exist; this server serves '{name}'", param="model", code="model_not_found")
        if _number(body, "n", 1, 1, 2**31, integer=True) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        _flag(body, "stream")
        _flag(_object(body, "stream_options"), "include_usage")
        _flag(_object(body, "chat_template_kwargs"), "enable_thinking", None)
        return body

    async def run(prompt: str, sampling: Sampling):
        """One whole generation in a worker thread; a cancelled request stops it before the slot is freed."""
        import anyio

        async with slot:
            stop = threading.Event()
            task = asyncio.get_running_loop().run_in_executor(None, complete, loaded, prompt, sampling, stop)
            try:
                return await asyncio.shield(task)
            finally:
                if not task.done():
                    stop.set()
                    app.state.stats["cancelled"] += 1
                    with anyio.CancelScope(shield=True):
                        await asyncio.wait([task])

    async def pieces(prompt: str, sampling: Sampling, result_box: dict):
        """Async pieces of text from the generation thread; leaving early stops it and frees the slot."""
        import anyio

        async with slot:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            stop = threading.Event()

            def work():
                try:
                    result = complete(loaded, prompt, sampling, stop, on_piece=lambda text: loop.call_soon_threadsafe(queue.put_nowait, ("piece", text)))
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
                except BaseException as error:  # noqa: BLE001 - reported to the client
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", error))

            task = loop.run_in_executor(None, work)
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield value
                    elif kind == "done":
                        result_box["result"] = value
                        return
                    else:
                        raise value
            finally:
                if "result" not in result_box:
                    stop.set()
                    app.state.stats["cancelled"] += 1
                with anyio.CancelScope(shield=True):
                    await task

    def sse(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def usage(result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "engine": loaded.engine, "busy": slot.locked(), **app.state.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "qwenforge"}]}

    def chat_prompt(body: dict) -> tuple:
        """(prompt, its token count, thinking mode, tools, forced reply start): template and tokenizer, run in a worker thread."""
        messages = _messages(body)
        enable_thinking = _object(body, "chat_template_kwargs").get("enable_thinking")
        tools, forced = _tools(body)
        try:
            prompt = build_prompt(loaded.tokenizer, messages, enable_thinking, tools) + forced
        except Exception as error:  # a template may reject a conversation (e.g. roles out of order)
            raise ApiError(400, f"the chat template rejected these messages: {error}", param="messages") from None
        return prompt, count_tokens(loaded, prompt), thinking_mode(loaded.tokenizer, messages, enable_thinking), tools, forced

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        prompt, prompt_tokens, thinking, tools, forced = await asyncio.to_thread(chat_prompt, body)
        sampling = request_sampling(loaded, body, prompt_tokens, thinking)
        app.state.stats["requests"] += 1
        ident, stamp = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            include_usage = _flag(_object(body, "stream_options"), "include_usage")

            async def events():
                head = {"id": ident, "object": "chat.completion.chunk", "created": stamp, "model": name}
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                box: dict = {}
                text, shown = opened_reasoning(prompt), (0, 0)
                calls_stream = ToolCallStream(forced, tool_names(tools)) if tools else None  # holds back <tool_call> blocks until they parse
                async for piece in pieces(prompt, sampling, box):
                    reasoning, answer = "", piece
                    if thinking_possible:
                        text += piece  # Qwen3, QwQ: reasoning goes out as reasoning_content, apart from the answer
                        reasoning, answer, shown = reasoning_deltas(text, shown)
                    if calls_stream:
                        answer = calls_stream.feed(answer)
                    delta = {key: value for key, value in (("reasoning_content", reasoning), ("content", answer)) if value}
                    if delta:
                        yield sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                result = box["result"]
                finish = _finish(result)
                reasoning, answer, shown = reasoning_deltas(text, shown, final=True) if thinking_possible else ("", "", shown)
                if calls_stream:
                    answer = calls_stream.feed(answer)
                delta = {key: value for key, value in (("reasoning_content", reasoning), ("content", answer)) if value}
                if delta:
                    yield sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                if calls_stream:
                    rest, calls = calls_stream.finish()
                    if rest:
                        yield sse({**head, "choices": [{"index": 0, "delta": {"content": rest}, "finish_reason": None}]})
                    if calls:
                        deltas = [{"index": index, **call} for index, call in enumerate(calls)]
                        yield sse({**head, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]})
                        finish = "tool_calls"
                yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(result)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        result = await run(prompt, sampling)
        reasoning, answer = split_reasoning(opened_reasoning(prompt) + result.text) if thinking_possible else ("", result.text)
        message, finish = {"role": "assistant", "content": forced + answer}, _finish(result)
        content, calls = parse_tool_calls(forced + answer, tool_names(tools)) if tools else (answer, None)
        if calls:
            message, finish = {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}, "tool_calls"
        if reasoning:
            message["reasoning_content"] = reasoning
        return {
            "id": ident,
            "object": "chat.completion",
            "created": stamp,
            "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage(result),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (raw text: no chat template is applied on this route)", param="prompt")
        sampling = request_sampling(loaded, body, await asyncio.to_thread(count_tokens, loaded, prompt))
        app.state.stats["requests"] += 1
        ident, stamp = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": stamp, "model": name}
        if body.get("stream"):

            async def events():
                box: dict = {}
                async for piece in pieces(prompt, sampling, box):
                    yield sse({**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]})
                yield sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(box["result"])}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        result = await run(prompt, sampling)
        return {**head, "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": _finish(result)}], "usage": usage(result)}

    return app


def _finish(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def serve(
    loaded, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, served_name: str | None = None, say=print,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> None:
    """Run the server until Ctrl-C."""
    import uvicorn

    app = build_app(loaded, api_key=api_key, served_name=served_name, max_request_bytes=max_request_bytes)
    say(f"serving {served_name or loaded.name} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)


def vllm_command(
    folder: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_name: str | None = None,
    dtype: str | None = None,
    tensor_parallel: int = 1,
    max_context: int | None = None,
    adapter: str | None = None,
    rope_scaling: dict | None = None,
) -> list[str]:
    """The `vllm serve` command line equivalent to `qwenforge serve` with these options (YaRN as Qwen's vLLM guide sets it)."""
    command = ["vllm", "serve", str(folder), "--host", host, "--port", str(port)]
    if served_name:
        command += ["--served-model-name", served_name]
    command += ["--dtype", dtype or "auto", "--tensor-parallel-size", str(tensor_parallel)]
    if max_context:
        command += ["--max-model-len", str(max_context)]
    if rope_scaling:
        command += ["--hf-overrides", json.dumps({"rope_scaling": rope_scaling})]
    if api_key:
        command += ["--api-key", api_key]
    if adapter:
        command += ["--enable-lora", "--lora-modules", f"{served_name or 'adapter'}={adapter}"]
    return command


def _visible_gpus_tensor_parallel(spec, context: int) -> int:
    import torch

    from qwenforge.infer.load import detect_hardware
    from qwenforge.multi_gpu import vllm_tensor_parallel

    if not torch.cuda.is_available():
        return 1
    hardware = detect_hardware()
    return vllm_tensor_parallel(spec, hardware.free_bytes, hardware.gpus, context)


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def run_vllm(command: list[str]) -> None:
    """Replace this process by vLLM's server; a clear error when vLLM is not installed."""
    executable = shutil.which("vllm")
    if executable is None and not vllm_importable():
        raise QwenforgeError(
            "vLLM is not installed (it needs a CUDA GPU): pip install vllm, then run: " + " ".join(command)
        )
    if executable is None:
        import sys

        os.execv(sys.executable, [sys.executable, "-m", "vllm.entrypoints.cli.main", *command[1:]])
    os.execv(executable, command)


def start_server(
    console, model: str, load_options: dict, host="127.0.0.1", port=8000, api_key=None, served_name=None, tensor_parallel=None, dry_run=False,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> None:
    """`qwenforge serve`: load MODEL and serve it, or hand it to vLLM's server (`--engine vllm`)."""
    from qwenforge.infer.load import load_model, resolve_source

    if max_request_bytes < 1:
        raise QwenforgeError(f"--max-request-bytes {max_request_bytes}: must be at least 1")

    if load_options.get("engine") == "vllm":
        from qwenforge.arch.long_context import yarn_scaling
        from qwenforge.infer.load import _spec

        source = resolve_source(model, load_options.get("base"), load_options.get("revision"))
        max_context = load_options.get("max_context")
        spec = _spec(Path(source["folder"]))
        if tensor_parallel is None:  # the fewest visible GPUs the model fits on
            tensor_parallel = _visible_gpus_tensor_parallel(spec, max_context or 4096)
        command = vllm_command(
            str(source["folder"]), host=host, port=port, api_key=api_key, served_name=served_name,
            dtype=load_options.get("dtype"), tensor_parallel=tensor_parallel, max_context=max_context,
            adapter=str(source["adapter"]) if source["adapter"] else None,
            rope_scaling=yarn_scaling(spec, max_context, model) if max_context else None,
        )
        if dry_run:
            console.print(" ".join(command), markup=False, highlight=False, soft_wrap=True)
            return
        run_vllm(command)
        return
    if tensor_parallel not in (None, 1):
        raise QwenforgeError("--tensor-parallel needs --engine vllm (the transformers path spreads layers over every visible GPU with device_map)")
    loaded = load_model(model, **load_options, say=lambda line: console.print(f"[dim]{line}[/dim]", highlight=False))
    serve(loaded, host=host, port=port, api_key=api_key, served_name=served_name, say=console.print, max_request_bytes=max_request_bytes)
