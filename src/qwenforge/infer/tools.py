"""Tool calling the Qwen way: tools rendered by the model's own chat template, `<tool_call>` replies parsed.

    qwenforge chat MODEL --tools tools.json      # then /tool RESULT answers a call
    client.chat.completions.create(..., tools=[...], tool_choice="auto")

Qwen2.5, QwQ and Qwen3 templates list the tools in the system turn and ask for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; results go back as `role: tool`
messages, which the templates wrap in `<tool_response>`. A reply whose call is not valid JSON
stays plain content: the client sees what the model wrote instead of an error. Small models may
leave the tags out (the real Qwen2.5-Coder-0.5B answers a bare `{"name": ..., "arguments": ...}`,
fenced as ```json with repetition_penalty 1.05): a reply that is exactly such an object, fenced or
not, naming one of the tools offered, is a call too.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from qwenforge.errors import QwenforgeError

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.S)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(\{.*\})\s*```\s*$", re.S)


def renders_tools(tokenizer) -> bool:
    """Whether the model's chat template lays out a `tools` list (Qwen2.5, QwQ and Qwen3 do)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def check_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI-shaped tools [{"type": "function", "function": {"name", ...}}]; a bare function schema is wrapped."""
    if not isinstance(tools, list) or not tools:
        raise QwenforgeError(f"{where}: need a non-empty JSON list of tools, e.g. [{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}]")
    clean = []
    for index, tool in enumerate(tools):
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or tool.get("type", "function") != "function":
            raise QwenforgeError(f"{where}[{index}]: need {{\"type\": \"function\", \"function\": {{\"name\": str, \"parameters\": {{...}}}}}}")
        clean.append({"type": "function", "function": function})
    return clean


def read_tools(path: Path) -> list[dict]:
    """The tools of `chat --tools FILE.json`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QwenforgeError(f"{path}: no such tools file; give a JSON list of OpenAI-style tools") from None
    except ValueError as error:
        raise QwenforgeError(f"{path}: not JSON ({error}); give a JSON list of OpenAI-style tools") from None
    return check_tools(data.get("tools") if isinstance(data, dict) else data, str(path))


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as the Qwen templates read them: tool-call arguments as objects (OpenAI sends JSON strings)."""
    shaped = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            fixed = []
            for call in calls:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass  # kept as written: the template shows it verbatim
                fixed.append({**call, "function": function})
            message = {**message, "content": message.get("content") or "", "tool_calls": fixed}
        shaped.append(message)
    return shaped


def _call(name: str, arguments) -> dict:
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[dict] | None]:
    """(content outside the calls, OpenAI `tool_calls`) of a reply; (text, None) when it has no well-formed call.

    With `names` (the tools offered), a reply that is only a bare call object counts as one call.
    """
    if TOOL_OPEN not in text:
        fenced = _FENCE.match(text)
        body = fenced.group(1) if fenced else text
        try:
            bare = json.loads(body) if names and body.strip().startswith("{") else None
        except ValueError:
            bare = None
        if isinstance(bare, dict) and bare.get("name") in names and isinstance(bare.get("arguments", {}), dict):
            return "", [_call(bare["name"], bare.get("arguments", {}))]
        return text, None
    calls = []
    for body in _BLOCK.findall(text):
        try:
            call = json.loads(body)
        except ValueError:
            return text, None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, None
        calls.append(_call(call["name"], call.get("arguments", {})))
    rest = _BLOCK.sub("", text)
    if not calls or TOOL_OPEN in rest:  # an unclosed call (cut by max_tokens) is not a call
        return text, None
    return rest, calls


def forced_prefix(tool_choice, tools: list[dict]) -> str:
    """The start of the reply that `tool_choice` imposes: "required" opens a call, a named function names it."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if tool_choice == "required":
        return TOOL_OPEN + '\n{"name": "'
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str) or name not in tool_names(tools):
        raise QwenforgeError(f"tool_choice {tool_choice!r}: use 'auto', 'none', 'required' or {{\"type\": \"function\", \"function\": {{\"name\": one of the tools}}}}")
    return TOOL_OPEN + "\n" + json.dumps({"name": name})[:-1] + ', "arguments": '


def tool_names(tools: list[dict] | None) -> set[str]:
    return {tool["function"]["name"] for tool in tools or []}


class ToolCallStream:
    """Streams a reply's content while holding back what may be a tool call, to be parsed at the end."""

    def __init__(self, prefix: str = "", names: set[str] | None = None):
        self.text, self.shown, self.names = prefix, 0, names

    def feed(self, piece: str) -> str:
        """The content that is now safe to show."""
        self.text += piece
        start = self.text.find(TOOL_OPEN)
        if self.names and not self.shown and (not self.text.strip() or self.text.lstrip()[:1] in ("{", "`")):
            return ""  # may be a bare call object: wait for the whole reply
        if start < 0:
            start = len(self.text)
            for size in range(min(len(TOOL_OPEN) - 1, len(self.text)), 0, -1):  # a tag may be arriving in pieces
                if TOOL_OPEN.startswith(self.text[-size:]):
                    start -= size
                    break
        new, self.shown = self.text[self.shown : start], max(self.shown, start)
        return new

    def finish(self) -> tuple[str, list[dict] | None]:
        """(the content not shown yet, the tool calls or None)."""
        content, calls = parse_tool_calls(self.text, self.names)
        if calls is None:
            return self.text[self.shown :], None
        return content[self.shown :].rstrip(), calls
