"""`qwenforge serve` as a real process on loopback, driven by the official openai client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
QWENFORGE = str(Path(sys.executable).parent / "qwenforge")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(model: str, name: str, *extra: str):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [QWENFORGE, "serve", model, "--port", str(port), "--served-name", name, "--threads", "1", *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return process, base
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("server did not start in 120 s")


def _stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _health(base):
    with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
        return json.load(response)


def _post(base, path, body: bytes, key=KEY):
    request = urllib.request.Request(f"{base}{path}", data=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(tiny_qwen3):
    process, base = _start(str(tiny_qwen3), "tiny", "--api-key", KEY, "--max-context", "2048")
    yield base
    _stop(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    """The same model loaded in-process the way the server loads it: greedy answers must agree."""
    from qwenforge.infer.generation import Sampling, build_prompt, complete
    from qwenforge.infer.load import load_model

    loaded = load_model(str(tiny_qwen3), threads=1)

    def answer(messages, max_tokens):
        return complete(loaded, build_prompt(loaded.tokenizer, messages), Sampling(temperature=0, max_new_tokens=max_tokens)).text

    return answer


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_health(client, server):
    assert [model.id for model in client.models.list().data] == ["tiny"]
    health = _health(server)
    assert health["model"] == "tiny" and health["engine"] == "transformers"


def test_chat_completion_plain_and_streaming_agree(client, reference):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == reference(MESSAGES, 8)
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_route_plain_and_streaming(client):
    plain = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 6
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == plain.choices[0].text


def test_eight_concurrent_clients_all_complete(client, reference):
    expected = {i: reference([{"role": "user", "content": f"Count to {i}."}], 12) for i in range(8)}

    def ask(i):
        response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=12, temperature=0)
        return i, response.choices[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, choice in answers:
        assert choice.finish_reason in ("stop", "length") and choice.message.content == expected[i]


def test_openai_style_errors(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert missing.value.status_code == 404 and missing.value.body["code"] == "model_not_found" and "tiny" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as malformed:
        client.chat.completions.create(model="tiny", messages=[{"role": "user"}], max_tokens=4)
    assert malformed.value.status_code == 400 and "content" in malformed.value.body["message"]
    long_prompt = [{"role": "user", "content": "word " * 2100}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=4)
    assert "context limit is 2048 tokens" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4000)
    assert "2048" in too_many.value.body["message"]
    status, body = _post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(server, "/v1/chat/completions", json.dumps({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}).encode())
    assert status == 400 and body["error"]["param"] == "temperature"
    wrong_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert _health(server)["status"] == "ok"  # still serving after every error


def test_client_that_disconnects_mid_stream_frees_the_slot(client, server):
    before = _health(server)["cancelled"]
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1900, temperature=1.0, stream=True)
    received = 0
    for chunk in stream:
        received += 1
        if received == 4:
            break
    stream.close()
    deadline = time.time() + 15
    while time.time() < deadline and (_health(server)["busy"] or _health(server)["cancelled"] == before):
        time.sleep(0.1)
    health = _health(server)
    assert health["cancelled"] == before + 1 and not health["busy"]
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_serve_binds_loopback_by_default():
    import inspect

    from qwenforge.cli import serve
    from qwenforge.infer.server import serve as library_serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"
    assert inspect.signature(library_serve).parameters["host"].default == "127.0.0.1"


@pytest.mark.slow
def test_embedded_model_served_answers_paris(embedded_model_dir):
    process, base = _start("embedded", "smol")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=30, temperature=0)
        assert answer.choices[0].message.content.strip() == "The capital of France is Paris."
    finally:
        _stop(process)
