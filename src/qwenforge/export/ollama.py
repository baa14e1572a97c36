"""The Ollama Modelfile written beside an exported GGUF: `ollama create NAME -f OUT.Modelfile`.

Ollama renders prompts with Go templates, not the checkpoint's Jinja chat template, so the ChatML
template (system prompt, tools, tool calls and responses) is restated in Go syntax; for Qwen3 the
thinking switch (`ollama run --think=false`, API `"think": false`) opens the answer with the empty
think block that Qwen3's Jinja template writes for `enable_thinking=False`. Stop tokens and the
sampling parameters come from the checkpoint's own files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# ChatML with Qwen's tool-calling prompt, as Qwen2.5's and Qwen3's Jinja templates write it.
_SYSTEM_AND_TOOLS = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}"""

_MESSAGES = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
@@ANSWER_OPENING@@{{ end }}
{{- end }}"""

_NO_THINKING = """{{ if and $.IsThinkSet (not $.Think) }}<think>

</think>

{{ end }}"""

# Ollama's PARAMETER names for generation_config.json's sampling fields.
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}


def chat_template_of(folder: Path) -> str | None:
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def go_template(jinja: str) -> str:
    """The Go template for a ChatML Jinja template; Qwen3's (with <think>) gets the thinking switch."""
    thinking = "<think>" in jinja or "enable_thinking" in jinja
    messages = _MESSAGES.replace("@@ANSWER_OPENING@@", _NO_THINKING if thinking else "")
    return "{{- if .Messages }}\n" + _SYSTEM_AND_TOOLS + "\n" + messages + """
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""


def default_system_prompt(jinja: str) -> str | None:
    """The system message a Qwen2.5 template inserts when the conversation has none."""
    found = re.search(r"\{%-? else -?%\}\s*\{\{-? '(You are [^']*)' -?\}\}", jinja)
    return found.group(1) if found else None


def stop_tokens(folder: Path, jinja: str | None) -> list[str]:
    """End-of-turn tokens: generation_config's eos ids by name (tokenizer.json's added tokens), plus ChatML's markers."""
    folder = Path(folder)
    generation = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
    eos = generation.get("eos_token_id", json.loads((folder / "config.json").read_text()).get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    tokenizer = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    added = {token["id"]: token["content"] for token in tokenizer.get("added_tokens", [])}
    names = [added[index] for index in ids if index in added]
    if jinja and "<|im_start|>" in jinja:
        names += ["<|im_start|>", "<|im_end|>"]
    return list(dict.fromkeys(names))


def modelfile_for(folder: Path, gguf_name: str) -> str:
    """Modelfile text for a GGUF exported from `folder`, referring to it as ./gguf_name."""
    folder = Path(folder)
    lines = [f"FROM ./{gguf_name}", ""]
    jinja = chat_template_of(folder)
    if jinja and "<|im_start|>" in jinja:
        lines += ['TEMPLATE """' + go_template(jinja) + '"""', ""]
        system = default_system_prompt(jinja)
        if system:
            lines += [f"SYSTEM {json.dumps(system)}", ""]
    else:
        lines += ["# no ChatML chat template in the checkpoint: Ollama falls back to the GGUF's tokenizer.chat_template", ""]
    for token in stop_tokens(folder, jinja):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    sampling = [(SAMPLING[key], generation[key]) for key in SAMPLING if generation.get(key) is not None]
    if sampling and generation.get("do_sample", True):
        lines += [f"PARAMETER {name} {value}" for name, value in sampling]
    else:
        lines.append("# generation_config.json recommends no sampling parameters: Ollama's defaults apply")
    return "\n".join(lines) + "\n"
