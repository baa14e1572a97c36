"""A curriculum folder: topics in the order of `curriculum.yaml`, each a folder of JSONL files.

    curriculum.yaml   topics: [tokens, attention]          (order of training)
                      voice_markers: [...], negative_patterns: [...]   (optional, for evaluation)
    <topic>/sft.jsonl   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                        the last message is the assistant's answer (the only tokens with loss)
    <topic>/dpo.jsonl   {"prompt": "...", "chosen": "...", "rejected": "..."}
    <topic>/eval.jsonl  {"prompt": "...", "reference": "...", "key_phrases": ["...", ...]}  (optional file)

Every line is checked before training starts; problems are reported as `file:line: what`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from qwenforge.errors import QwenforgeError
from qwenforge.files import read_text

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Topic:
    name: str
    folder: Path
    sft: tuple[dict, ...]
    dpo: tuple[dict, ...]
    eval: tuple[dict, ...]


@dataclass(frozen=True)
class Curriculum:
    folder: Path
    topics: tuple[Topic, ...]
    voice_markers: tuple[str, ...] = ()
    negative_patterns: tuple[str, ...] = ()


def sample_curriculum() -> Path:
    """The two-topic curriculum qwenforge ships (its own writing), used by the demo and tests."""
    return Path(str(resources.files("qwenforge") / "data" / "curriculum"))


def _check_sft(record: dict) -> str | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return 'expected {"messages": [...]} with at least one user and one assistant message'
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{index}].role must be one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"messages[{index}].content must be non-empty text"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    if not any(m["role"] == "user" for m in messages):
        return "needs at least one user message"
    return None


def _check_text_fields(record: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        if not isinstance(record.get(name), str) or not record[name].strip():
            return f'field "{name}" must be non-empty text'
    return None


def _check_dpo(record: dict) -> str | None:
    problem = _check_text_fields(record, ("prompt", "chosen", "rejected"))
    if problem is None and record["chosen"].strip() == record["rejected"].strip():
        return "chosen and rejected are identical"
    return problem


def _check_eval(record: dict) -> str | None:
    problem = _check_text_fields(record, ("prompt", "reference"))
    phrases = record.get("key_phrases", [])
    if problem is None and (not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases)):
        return 'field "key_phrases" must be a list of text'
    return problem


CHECKS = {"sft.jsonl": _check_sft, "dpo.jsonl": _check_dpo, "eval.jsonl": _check_eval}


def read_jsonl(path: Path, problems: list[str]) -> tuple[dict, ...]:
    """Records of a JSONL file; each malformed line adds `file:line: what` to `problems`."""
    check = CHECKS[path.name]
    records = []
    try:
        lines = read_text(path, "curriculum file", allow_empty=True).splitlines()
    except QwenforgeError as error:
        problems.append(str(error))
        return ()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            problems.append(f"{path}:{number}: not valid JSON ({error.msg})")
            continue
        problem = "expected a JSON object" if not isinstance(record, dict) else check(record)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            records.append(record)
    return tuple(records)


def load_curriculum(folder: Path | str) -> Curriculum:
    """Read and check every file; any problem stops here, before a model is loaded."""
    folder = sample_curriculum() if str(folder) == "sample" else Path(folder)
    index = folder / "curriculum.yaml"
    if not index.exists():
        raise QwenforgeError(f"{index}: not found; a curriculum folder needs curriculum.yaml listing its topics")
    try:
        meta = yaml.safe_load(read_text(index, "curriculum index")) or {}
    except yaml.YAMLError as error:
        raise QwenforgeError(f"{index}: not valid YAML ({str(error).splitlines()[0]})") from error
    names = meta.get("topics") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise QwenforgeError(f"{index}: topics: expected a list of topic folder names")
    if len(set(names)) != len(names):
        raise QwenforgeError(f"{index}: topics: a topic is listed twice")
    problems: list[str] = []
    topics = []
    for name in names:
        topic_folder = folder / name
        if not (topic_folder / "sft.jsonl").exists():
            problems.append(f"{topic_folder / 'sft.jsonl'}: missing (topic {name!r} of {index})")
            continue
        sft = read_jsonl(topic_folder / "sft.jsonl", problems)
        dpo = read_jsonl(topic_folder / "dpo.jsonl", problems) if (topic_folder / "dpo.jsonl").exists() else ()
        evals = read_jsonl(topic_folder / "eval.jsonl", problems) if (topic_folder / "eval.jsonl").exists() else ()
        if not sft and not problems:
            problems.append(f"{topic_folder / 'sft.jsonl'}: no examples")
        topics.append(Topic(name, topic_folder, sft, dpo, evals))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise QwenforgeError("; ".join(problems[:3]) + more)
    return Curriculum(
        folder,
        tuple(topics),
        tuple(meta.get("voice_markers") or ()),
        tuple(meta.get("negative_patterns") or ()),
    )


def sft_records(topic: Topic) -> list[dict]:
    """Prompt/completion conversations: the loss then falls on the assistant's answer only."""
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in topic.sft]


def dpo_records(topic: Topic) -> list[dict]:
    """Conversational preference pairs, so the model's chat template frames prompt and answers."""
    rows = []
    for r in topic.dpo:
        prompt = ([{"role": "system", "content": r["system"]}] if r.get("system") else []) + [{"role": "user", "content": r["prompt"]}]
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        })
    return rows
