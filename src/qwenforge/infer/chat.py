"""`qwenforge chat MODEL`: a streaming terminal conversation through the model's own chat template.

    qwenforge chat embedded --system "Answer briefly." --temperature 0

Answers render as Markdown while they stream; reasoning (<think>, Qwen3 and QwQ) is shown apart,
dimmed. `/think on|off` switches Qwen3's reasoning for the session; `/think` or `/no_think` inside a
message is Qwen3's own soft switch for that turn, passed to the model. Sampling follows the model
(generation_config.json, Qwen3's per-mode presets) unless set. Ctrl-C stops the answer, not the session.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.text import Text

from qwenforge.errors import QwenforgeError
from qwenforge.files import write_text
from qwenforge.infer.generation import (
    Sampling,
    build_prompt,
    opened_reasoning,
    reasons,
    resolve_sampling,
    soft_switch,
    split_reasoning,
    stream,
    supports_thinking,
    thinking_mode,
)
from qwenforge.infer.tools import parse_tool_calls, read_tools, tool_names

HELP = """\
/help                      this list
/system [TEXT]             set the system prompt (no TEXT: show it)
/set key=value ...         temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty,
                           repetition_penalty, max_new_tokens, seed; key=default follows the model
                           (no args: show the settings in use)
/think on|off              Qwen3 reasoning on or off for the session
... /think, /no_think      inside a message: Qwen3's soft switch for that turn (sent to the model)
/tool RESULT               answer the model's tool call with RESULT (chat --tools FILE.json)
/reset                     forget the conversation (keeps the system prompt)
/save FILE                 write the conversation and settings as JSON
/load FILE                 read a conversation saved with /save
/exit                      leave (Ctrl-D too)
End a line with \\ to continue on the next; a line of \"\"\" starts and ends a multi-line block.
Ctrl-C stops an answer while it is written."""


@dataclass
class Conversation:
    """Everything /save writes and /load reads back."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    enable_thinking: bool | None = None
    tools: list[dict] | None = None

    def to_dict(self) -> dict:
        return {"system": self.system, "messages": self.messages, "sampling": self.sampling.to_dict(), "enable_thinking": self.enable_thinking, "tools": self.tools}

    @classmethod
    def from_file(cls, path: Path) -> "Conversation":
        from qwenforge.checkpoint.folder import read_json

        data = read_json(Path(path))
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise QwenforgeError(f"{path}: not a saved conversation (no 'messages' list); save one with /save FILE")
        sampling = Sampling().updated(**{k: v for k, v in (data.get("sampling") or {}).items() if v is not None})
        return cls(data.get("system"), data["messages"], sampling, data.get("enable_thinking"), data.get("tools"))

    def prompt_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages


def render(text: str, thinking_possible: bool):
    """Reasoning in a dim panel above the Markdown answer."""
    reasoning, answer = split_reasoning(text) if thinking_possible else ("", text)
    parts = []
    if reasoning:
        parts.append(Panel(Text(reasoning, style="dim italic"), title="reasoning", title_align="left", border_style="dim"))
    if answer.strip():
        parts.append(Markdown(answer))
    return Group(*parts)


def read_message(console: Console, read=input) -> str | None:
    """One user turn: continuation lines ending in \\, or a \"\"\" block; None at end of input."""
    try:
        line = read(">>> ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                more = read("... ")
            except EOFError:
                break
            if more.strip() == '"""':
                break
            lines.append(more)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read("... "))
        except EOFError:
            break
    return "\n".join(lines)


def settings_line(loaded, conversation: Conversation) -> str:
    """The sampling in use: what was set, then what comes from the model and from where."""
    messages = conversation.prompt_messages()
    resolved, origin = resolve_sampling(loaded, conversation.sampling, thinking_mode(loaded.tokenizer, messages, conversation.enable_thinking))
    explicit = conversation.sampling.explicit()
    model = {key: value for key, value in resolved.to_dict().items() if key not in explicit and value is not None}
    shown = " ".join(f"{key}={value}" for key, value in explicit.items())
    return f"{shown} | from the model ({origin}): " + " ".join(f"{key}={value}" for key, value in model.items())


def is_message(line: str) -> bool:
    """A line starting with Qwen3's soft switch is a message ("/no_think Why?"), not a REPL command; `/think on|off` is."""
    name, _, rest = line.strip().partition(" ")
    return name == "/no_think" or (name == "/think" and rest.strip() not in ("", "on", "off"))


def show_soft_switch(console: Console, loaded, conversation: Conversation, line: str) -> None:
    """Say that a /think or /no_think in the message goes to the model, and what it will do."""
    switch = soft_switch(line)
    if not switch:
        return
    if not supports_thinking(loaded.tokenizer):
        note = "this model has no thinking switch: sent as plain text"
    elif conversation.enable_thinking is False:
        note = "the template ignores it while /think off is set"
    else:
        note = f"the model is asked to {'reason' if switch == '/think' else 'answer without reasoning'}"
    console.print(f"[dim]soft switch {switch}: {note}[/dim]", highlight=False)


def answer(console: Console, loaded, conversation: Conversation) -> None:
    """Stream one answer into a live Markdown view; Ctrl-C keeps what was written so far."""
    thinking_possible = reasons(loaded.tokenizer)
    messages = conversation.prompt_messages()
    prompt = build_prompt(loaded.tokenizer, messages, conversation.enable_thinking, conversation.tools)
    sampling, _ = resolve_sampling(loaded, conversation.sampling, thinking_mode(loaded.tokenizer, messages, conversation.enable_thinking))
    stop = threading.Event()
    pieces = stream(loaded, prompt, sampling, stop)
    text = opened_reasoning(prompt)  # QwQ's prompt opens <think> itself
    result = None
    with Live(render("", thinking_possible), console=console, refresh_per_second=8, vertical_overflow="visible") as live:
        try:
            while True:
                try:
                    text += next(pieces)
                except StopIteration as done:
                    result = done.value
                    break
                live.update(render(text, thinking_possible))
        except KeyboardInterrupt:
            pieces.close()
            live.update(render(text, thinking_possible))
    _, reply = split_reasoning(text) if thinking_possible else ("", text)
    content, calls = parse_tool_calls(reply, tool_names(conversation.tools)) if conversation.tools else (reply, None)
    message = {"role": "assistant", "content": content.strip()}
    if calls:
        message["tool_calls"] = calls
        for call in calls:
            say(console, f"tool call: {call['function']['name']}({call['function']['arguments']})  -> answer with /tool RESULT")
    conversation.messages.append(message)
    if result is None:
        console.print("[yellow]\\[stopped][/yellow]", highlight=False)
    else:
        console.print(
            f"[dim]{result.completion_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, first token {result.first_token_seconds:.2f}s[/dim]",
            highlight=False,
        )


def say(console: Console, text: str) -> None:
    """Plain text: no markup, no highlighting (a path or number stays as typed)."""
    console.print(text, markup=False, highlight=False)


def command(console: Console, loaded, conversation: Conversation, line: str) -> bool:
    """Run one /command; False means leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        say(console, HELP)
    elif name == "/reset":
        conversation.messages.clear()
        say(console, "conversation cleared")
    elif name == "/system":
        if rest:
            conversation.system = rest
            say(console, "system prompt set")
        else:
            say(console, f"system prompt: {conversation.system!r}")
    elif name == "/set":
        if rest:
            pairs = [item.split("=", 1) for item in rest.split()]
            if any(len(pair) != 2 for pair in pairs):
                raise QwenforgeError("use /set key=value ..., e.g. /set temperature=0.7 top_p=0.8 max_new_tokens=512")
            conversation.sampling = conversation.sampling.updated(**dict(pairs))
        say(console, settings_line(loaded, conversation))
    elif name == "/think":
        if not supports_thinking(loaded.tokenizer):
            raise QwenforgeError("this model's chat template has no thinking switch (enable_thinking); /think needs a Qwen3 model")
        if rest not in ("on", "off"):
            raise QwenforgeError("use /think on or /think off")
        conversation.enable_thinking = rest == "on"
        say(console, f"thinking {rest}")
    elif name == "/tool":
        if not rest:
            raise QwenforgeError("use /tool RESULT, e.g. /tool {\"temperature\": 21}")
        calls = conversation.messages[-1].get("tool_calls") if conversation.messages else None
        if not calls:
            raise QwenforgeError("the model's last answer made no tool call; /tool answers one (start chat with --tools FILE.json)")
        conversation.messages.append({"role": "tool", "content": rest, "tool_call_id": calls[0]["id"], "name": calls[0]["function"]["name"]})
        try:
            answer(console, loaded, conversation)
        except QwenforgeError:
            conversation.messages.pop()
            raise
    elif name == "/save":
        if not rest:
            raise QwenforgeError("use /save FILE")
        write_text(Path(rest).expanduser(), json.dumps(conversation.to_dict(), indent=2) + "\n", "saved conversation")
        say(console, f"saved {len(conversation.messages)} messages to {rest}")
    elif name == "/load":
        if not rest:
            raise QwenforgeError("use /load FILE")
        loaded_conversation = Conversation.from_file(Path(rest).expanduser())
        conversation.system, conversation.messages = loaded_conversation.system, loaded_conversation.messages
        conversation.sampling, conversation.enable_thinking = loaded_conversation.sampling, loaded_conversation.enable_thinking
        conversation.tools = loaded_conversation.tools or conversation.tools
        say(console, f"loaded {len(conversation.messages)} messages from {rest}")
    else:
        raise QwenforgeError(f"unknown command {name}; /help lists the commands")
    return True


def run_chat(console: Console, loaded, conversation: Conversation | None = None, read=input) -> Conversation:
    """The REPL: read a turn or a /command, answer, repeat until /exit or end of input."""
    conversation = conversation or Conversation()
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must reach the REPL even when the parent process ignored or blocked SIGINT (both are inherited
        # across exec: a pytest-xdist worker started this way let answers run on through five ^C)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    console.print(f"[dim]{loaded.describe()}[/dim]", highlight=False)
    console.print("[dim]/help for commands, /exit to leave; Ctrl-C stops an answer[/dim]", highlight=False)
    while True:
        try:
            line = read_message(console, read)
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C stops answers; /exit or Ctrl-D leaves)[/dim]", highlight=False)
            continue
        if line is None:
            console.print()
            return conversation
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not is_message(line):
                if not command(console, loaded, conversation, line.strip()):
                    return conversation
                continue
            show_soft_switch(console, loaded, conversation, line)
            conversation.messages.append({"role": "user", "content": line})
            answer(console, loaded, conversation)
        except QwenforgeError as error:
            if conversation.messages and conversation.messages[-1]["role"] == "user" and conversation.messages[-1]["content"] == line:
                conversation.messages.pop()
            console.print(f"[red]error:[/red] {error}", highlight=False)


def start_chat(
    console: Console, model: str, load_options: dict, system=None, sampling=None, enable_thinking=None, conversation_file=None, tools_file=None
) -> Conversation:
    """`qwenforge chat`: load MODEL for this machine, then run the REPL."""
    from qwenforge.infer.load import load_model

    conversation = Conversation.from_file(conversation_file) if conversation_file else Conversation()
    if tools_file:
        conversation.tools = read_tools(tools_file)
    if not conversation_file:
        conversation.sampling = Sampling().updated(**{k: v for k, v in (sampling or {}).items() if v is not None})
    conversation.system = system or conversation.system
    if enable_thinking is not None:
        conversation.enable_thinking = enable_thinking
    with console.status("loading the model ..."):
        loaded = load_model(model, **load_options)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    return run_chat(console, loaded, conversation)
