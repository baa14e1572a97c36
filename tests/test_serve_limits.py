"""`qwenforge serve` under hostile requests, in process (httpx over ASGI): size limit, 400 for every
malformed field, and templating/tokenizing off the event loop so /health never waits on a prompt."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from qwenforge.infer import server

httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with (httpx's API)


@pytest.fixture(scope="module")
def loaded(tiny_qwen3):
    from qwenforge.infer.load import load_model

    return load_model(str(tiny_qwen3), threads=1)


def _request(app, method, path, **kwargs):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


MESSAGES = [{"role": "user", "content": "Hi"}]
GOOD = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize(
    "change, param",
    [
        ({"stream_options": [1]}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
        ({"stream": "yes"}, "stream"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "no"}}, "enable_thinking"),
        ({"n": "2"}, "n"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_p": [1]}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"model": 5}, "model"),
    ],
)
def test_every_malformed_chat_field_is_a_400(loaded, change, param):
    app = server.build_app(loaded, served_name="tiny")
    response = _request(app, "POST", "/v1/chat/completions", json={**GOOD, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


@pytest.mark.parametrize("body", [b"[1]", b'"text"', b"\xff\xfe", b"", json.dumps({"model": "tiny", "prompt": 5}).encode()])
def test_malformed_completion_bodies_are_400(loaded, body):
    app = server.build_app(loaded, served_name="tiny")
    response = _request(app, "POST", "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_a_body_over_the_limit_is_413_declared_or_chunked(loaded):
    app = server.build_app(loaded, served_name="tiny", max_request_bytes=1000)
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    response = _request(app, "POST", "/v1/chat/completions", content=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    async def chunks():  # no Content-Length: the limit is counted while reading
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    response = _request(app, "POST", "/v1/chat/completions", content=chunks())
    assert response.status_code == 413
    small = _request(app, "POST", "/v1/chat/completions", json=GOOD)
    assert small.status_code == 200 and small.json()["choices"][0]["message"]["role"] == "assistant"


def test_health_answers_while_a_prompt_is_tokenized(loaded, monkeypatch):
    """Tokenizing blocks here until /health has answered: on the event loop it would deadlock."""
    release, entered = threading.Event(), threading.Event()
    original = server.count_tokens

    def slow_count(loaded_model, text):
        entered.set()
        if not release.wait(20):  # on the event loop /health could not answer, so nothing releases this
            raise RuntimeError("tokenizing blocked the event loop")
        return original(loaded_model, text)

    monkeypatch.setattr(server, "count_tokens", slow_count)
    app = server.build_app(loaded, served_name="tiny")

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as client:
            chat = asyncio.create_task(client.post("/v1/chat/completions", json=GOOD))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await asyncio.wait_for(client.get("/health"), 20)  # a guard against a hang, not a speed claim
            release.set()
            return health, await chat

    health, chat = asyncio.run(scenario())
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert chat.status_code == 200


def test_cli_refuses_a_zero_request_limit():
    from typer.testing import CliRunner

    from qwenforge.cli import app

    result = CliRunner().invoke(app, ["serve", "embedded", "--max-request-bytes", "0"])
    assert isinstance(result.exception, server.QwenforgeError) and "--max-request-bytes 0" in str(result.exception)
