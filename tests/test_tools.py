"""Tool calling: tools rendered by the model's template, <tool_call> replies parsed into OpenAI tool_calls.

The protocol is driven with the official openai client against a server on 127.0.0.1; scripted
replies stand in for a model that calls tools (a tiny random model never does); the real Qwen2.5
makes a real call in the slow test.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from qwenforge.errors import QwenforgeError
from qwenforge.infer.generation import Result, build_prompt
from qwenforge.infer.tools import ToolCallStream, check_tools, forced_prefix, parse_tool_calls, read_tools

openai = pytest.importorskip("openai")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_tool_calls_well_formed_several_and_malformed():
    content, calls = parse_tool_calls("Let me check.\n" + CALL)
    assert content.strip() == "Let me check." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    two = parse_tool_calls(CALL + "\n" + CALL.replace("Paris", "Rome"))[1]
    assert [json.loads(call["function"]["arguments"])["city"] for call in two] == ["Paris", "Rome"]
    for malformed in ['<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>', "<tool_call>\n[1, 2]\n</tool_call>", '<tool_call>\n{"name": "x"']:
        assert parse_tool_calls(malformed) == (malformed, None)
    assert parse_tool_calls("Paris is sunny.") == ("Paris is sunny.", None)
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'  # what the real Qwen2.5-Coder-0.5B answers
    content, calls = parse_tool_calls(bare, {"get_weather"})
    assert content == "" and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_calls(bare) == (bare, None) and parse_tool_calls(bare, {"other"}) == (bare, None)
    fenced = "```json\n" + bare + "\n```"  # what it answers with repetition_penalty 1.05
    assert parse_tool_calls(fenced, {"get_weather"})[1][0]["function"]["name"] == "get_weather"
    assert parse_tool_calls("Here:\n" + fenced, {"get_weather"})[1] is None
    assert parse_tool_calls('{"name": "get_weather"} and more', {"get_weather"})[1] is None


def test_streaming_holds_back_a_call_until_it_parses():
    stream = ToolCallStream()
    shown = "".join(stream.feed(piece) for piece in ["Let me ", "check.\n<tool", "_call>\n{\"name\": ", '"get_weather", "arguments": {}}\n</tool_call>'])
    assert shown == "Let me check.\n"
    rest, calls = stream.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_weather"
    broken = ToolCallStream()
    shown = "".join(broken.feed(piece) for piece in ["Hi <tool_call>\n{oops", "}\n</tool_call>"])
    rest, calls = broken.finish()
    assert calls is None and shown + rest == "Hi <tool_call>\n{oops}\n</tool_call>"
    bare = ToolCallStream(names={"get_weather"})
    assert "".join(bare.feed(piece) for piece in [' {"name": "get_weather", ', '"arguments": {"city": "Paris"}}']) == ""
    assert bare.finish()[1][0]["function"]["name"] == "get_weather"
    fenced = ToolCallStream(names={"get_weather"})
    assert fenced.feed("```json\n{") == "" and fenced.feed('"name": "get_weather", "arguments": {}}\n```') == ""
    assert fenced.finish()[1][0]["function"]["name"] == "get_weather"
    data = ToolCallStream(names={"get_weather"})
    assert data.feed('{"a": 1}') == "" and data.finish() == ('{"a": 1}', None)
    lone = ToolCallStream()
    assert lone.feed("x <") == "x " and lone.feed("y") == "<y"


def test_tools_file_and_tool_choice_checks(tmp_path):
    bare = tmp_path / "tools.json"
    bare.write_text(json.dumps([WEATHER["function"]]))
    assert read_tools(bare) == [WEATHER]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"type": "function"}]')
    with pytest.raises(QwenforgeError, match=r"bad.json\[0\]"):
        read_tools(bad)
    with pytest.raises(QwenforgeError, match="no such tools file"):
        read_tools(tmp_path / "missing.json")
    assert forced_prefix("auto", [WEATHER]) == "" and forced_prefix("required", [WEATHER]).startswith("<tool_call>")
    assert forced_prefix({"type": "function", "function": {"name": "get_weather"}}, [WEATHER]) == '<tool_call>\n{"name": "get_weather", "arguments": '
    with pytest.raises(QwenforgeError, match="tool_choice"):
        forced_prefix({"type": "function", "function": {"name": "nope"}}, [WEATHER])
    with pytest.raises(QwenforgeError, match="non-empty"):
        check_tools({"get_weather": {}})


def test_the_models_own_template_renders_tools_calls_and_results(qwen25_tokenizer_dir):
    from qwenforge.infer.load import load_tokenizer

    tokenizer = load_tokenizer(qwen25_tokenizer_dir)
    openai_call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [openai_call]},
        {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "call_1"},
    ]
    prompt = build_prompt(tokenizer, messages, tools=[WEATHER])
    assert prompt == tokenizer.apply_chat_template(
        [messages[0], {"role": "assistant", "content": "", "tool_calls": [{**openai_call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, messages[2]],
        tools=[WEATHER], tokenize=False, add_generation_prompt=True,
    )
    assert '"name": "get_weather"' in prompt and '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt  # arguments not double-encoded
    assert "<tool_response>\n{\"sky\": \"sunny\"}\n</tool_response>" in prompt
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(QwenforgeError, match="no tools section"):
        build_prompt(tokenizer, messages[:1], tools=[WEATHER])


def _serve_in_thread(loaded):
    import uvicorn

    from qwenforge.infer.server import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(loaded, served_name="tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    return server, thread, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tiny_qwen3):
    from qwenforge.infer.load import load_model

    loaded = load_model(str(tiny_qwen3), dtype="float32", threads=1)
    server, thread, client = _serve_in_thread(loaded)
    yield client
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def scripted(monkeypatch):
    """Replace generation by a scripted reply; records the prompts the server built."""
    from qwenforge.infer import server

    seen = {"prompts": []}

    def fake_complete(loaded, prompt, sampling, stop=None, on_piece=None):
        seen["prompts"].append(prompt)
        text = seen["reply"]
        for start in range(0, len(text), 7):
            if on_piece:
                on_piece(text[start : start + 7])
        return Result(text, 10, 12, "stop", 0.1, 0.01)

    monkeypatch.setattr(server, "complete", fake_complete)
    return seen


def test_server_returns_tool_calls_plain_and_streaming(served, scripted):
    scripted["reply"] = "<think>\nThe user wants weather.\n</think>\n\n" + CALL
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=50)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert "# Tools" in scripted["prompts"][-1] and '"name": "get_weather"' in scripted["prompts"][-1]
    chunks = list(served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=50, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(delta.content or "" for delta in deltas) == ""
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == "The user wants weather."
    calls = [call for delta in deltas for call in (delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"

    history = messages + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": '{"sky": "sunny", "celsius": 21}'}]
    scripted["reply"] = "It is sunny and 21 °C in Paris."
    after = served.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=50)
    assert after.choices[0].message.content == "It is sunny and 21 °C in Paris." and after.choices[0].finish_reason == "stop"
    assert '<tool_response>\n{"sky": "sunny", "celsius": 21}\n</tool_response>' in scripted["prompts"][-1]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in scripted["prompts"][-1]


def test_server_malformed_tool_call_is_plain_content(served, scripted):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'
    scripted["reply"] = "<think>\n\n</think>\n\n" + broken
    messages = [{"role": "user", "content": "Weather?"}]
    answer = served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=50)
    assert answer.choices[0].message.content == broken and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=50, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == broken
    scripted["reply"] = "plain " + CALL
    unparsed = served.chat.completions.create(model="tiny", messages=messages, max_tokens=50)  # no tools sent: nothing is parsed
    assert unparsed.choices[0].message.content.endswith("</tool_call>") and "# Tools" not in scripted["prompts"][-1]
    none = served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=50)
    assert none.choices[0].message.tool_calls is None and "# Tools" not in scripted["prompts"][-1]
    with pytest.raises(openai.BadRequestError) as bad:
        served.chat.completions.create(model="tiny", messages=messages, tools=[{"type": "function"}], max_tokens=5)
    assert bad.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as bad_choice:
        served.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=5)
    assert bad_choice.value.body["param"] == "tool_choice"


def test_forced_tool_choice_on_a_real_tiny_generation_never_fails(served):
    """The tiny random model continues a forced call with noise: returned as content, not a 500."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = served.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice=named, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_real_qwen25_calls_a_tool_through_the_openai_client(embedded_model_dir):
    from qwenforge.infer.load import load_model

    loaded = load_model(str(embedded_model_dir), threads=2)
    server, thread, client = _serve_in_thread(loaded)
    client = client.with_options(timeout=600)
    try:
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        answer = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=40, temperature=0, stream=True))
        streamed = [c for chunk in chunks if chunk.choices for c in (chunk.choices[0].delta.tool_calls or [])]
        assert [c.function.name for c in streamed] == ["get_weather"] and json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
        history = messages + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
        final = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
        assert final.choices[0].finish_reason == "stop" and "21" in final.choices[0].message.content
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_chat_repl_shows_a_tool_call_and_sends_the_result_back(tiny_qwen3, tmp_path, monkeypatch):
    from rich.console import Console

    from qwenforge.infer import chat
    from qwenforge.infer.load import load_model

    replies = iter(["<think>\nweather\n</think>\n\n" + CALL, "Sunny, 21 °C."])
    prompts = []

    def fake_stream(loaded, prompt, sampling, stop=None):
        prompts.append(prompt)
        yield next(replies)
        return Result("", 10, 3, "stop", 0.1, 0.01)

    monkeypatch.setattr(chat, "stream", fake_stream)
    lines = iter(["/tool 21", "Weather in Paris?", '/tool {"sky": "sunny", "celsius": 21}'])
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    console = Console(record=True, width=200)
    conversation = chat.Conversation(tools=read_tools(tools))

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat.run_chat(console, load_model(str(tiny_qwen3), threads=1), conversation, read=read)
    shown = console.export_text()
    assert "last answer made no tool call" in shown
    assert 'tool call: get_weather({"city": "Paris"})' in shown
    assert "# Tools" in prompts[0] and '<tool_response>\n{"sky": "sunny", "celsius": 21}\n</tool_response>' in prompts[1]
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    assert conversation.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather" and conversation.messages[-1]["content"] == "Sunny, 21 °C."


def test_chat_cli_refuses_a_bad_tools_file_before_loading(tmp_path):
    from typer.testing import CliRunner

    from qwenforge.cli import app

    bad = tmp_path / "tools.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(app, ["chat", str(tmp_path / "no-model"), "--tools", str(bad)])
    assert isinstance(result.exception, QwenforgeError) and "tools.json: not JSON" in str(result.exception)


def test_sampling_extra_body_fields_reach_generation(served):
    """top_k/min_p/repetition_penalty as extra body fields, as vLLM reads them: top_k=1 at temperature 1.5 is the greedy answer."""
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = served.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, extra_body={"repetition_penalty": 1.0})
    top1 = served.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.5, seed=3, presence_penalty=0.0,
                                          extra_body={"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.0})
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as bad:
        served.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"top_k": "many"})
    assert bad.value.body["param"] == "top_k"
