"""Every file argument of every verb, given a bad file: exit 2 and one line on stderr, no traceback.

The table lists each verb's file arguments with the kinds of bad file they must refuse: missing, a
folder where a file belongs (or a file where a folder belongs), bytes that are not UTF-8, an empty
file and a file of the wrong JSON/YAML shape. A new verb or option gets a row here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from qwenforge.cli import main

NOT_UTF8 = b"caf\xe9 \xff\xfe\n"


def make_file(tmp: Path, kind: str, name: str, good: bytes = b"") -> Path:
    """A file argument of the given kind of badness."""
    path = tmp / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir()
        return path
    path.write_bytes({"not-utf8": NOT_UTF8, "empty": b"", "json-list": b"[1, 2]\n", "yaml-list": b"- 1\n- 2\n"}.get(kind, good))
    return path


def make_folder(tmp: Path, kind: str, good: Path | None = None) -> Path:
    """A checkpoint-folder argument of the given kind: missing, a plain file, no config.json, or a
    copy of `good` whose config.json is not UTF-8, empty or a JSON list."""
    path = tmp / "bad-model"
    if kind == "missing":
        return path
    if kind == "file":
        path.write_text("not a folder\n")
        return path
    if kind == "no-config":
        path.mkdir()
        return path
    shutil.copytree(good, path)
    (path / "config.json").write_bytes({"not-utf8": NOT_UTF8, "empty": b"", "json-list": b"[1, 2]\n"}[kind])
    return path


FOLDER_KINDS = ["missing", "file", "no-config", "not-utf8", "empty", "json-list"]
TEXT_KINDS = ["missing", "folder", "not-utf8", "empty"]
JSONL_KINDS = ["missing", "folder", "not-utf8", "empty", "json-list"]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """`qwenforge ARGS` in this process, through the console entry point (main), as a user runs it."""
    argv = sys.argv
    sys.argv = ["qwenforge", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def assert_one_line_exit_2(args, capsys, mentions: Path | None = None) -> str:
    code, err = run_cli(args, capsys)
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith("error: "), err
    if mentions is not None:
        assert mentions.name in err, err
    return err


# --- verbs whose argument is a model folder --------------------------------------------------------


@pytest.mark.parametrize("kind", FOLDER_KINDS)
@pytest.mark.parametrize(
    "verb",
    [
        lambda m, t: ["spec", m],
        lambda m, t: ["plan", m],
        lambda m, t: ["convert", m, t / "out", "--dry-run"],
        lambda m, t: ["compare", m, m, "--text", t / "text.txt"],
        lambda m, t: ["heal", m, t / "out", "--teacher", m],
        lambda m, t: ["distill", "capture", m, "--data", t / "text.txt", "--out", t / "out"],
        lambda m, t: ["distill", "online", m, m, "--data", t / "text.txt", "--heldout", t / "text.txt", "--out", t / "out"],
        lambda m, t: ["distill", "init-student", m, t / "out"],
        lambda m, t: ["generate", m, "-i", t / "in.jsonl", "-o", t / "out.jsonl"],
        lambda m, t: ["chat", m],
        lambda m, t: ["serve", m],
    ],
    ids=["spec", "plan", "convert", "compare", "heal", "distill-capture", "distill-online", "init-student", "generate", "chat", "serve"],
)
def test_bad_model_folder(tmp_path, capsys, tiny_qwen2, verb, kind):
    (tmp_path / "text.txt").write_text("Some text to measure on. " * 40)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": "Hi"}) + "\n")
    model = make_folder(tmp_path, kind, tiny_qwen2)
    assert_one_line_exit_2(verb(model, tmp_path), capsys, mentions=model)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.jsonl").exists()


# --- text, JSONL and YAML file arguments ------------------------------------------------------------


@pytest.mark.parametrize("kind", TEXT_KINDS)
@pytest.mark.parametrize(
    "verb",
    [
        lambda f, t, m: ["compare", m, m, "--text", f],
        lambda f, t, m: ["convert", m, t / "out", "--calibration-text", f, "--dry-run"],
        lambda f, t, m: ["convert", m, t / "out", "--fidelity-text", f, "--dry-run"],
        lambda f, t, m: ["heal", m, t / "out", "--teacher", m, "--text", f],
        lambda f, t, m: ["heal", m, t / "out", "--teacher", m, "--heldout", f],
        lambda f, t, m: ["distill", "capture", m, "--data", f, "--out", t / "out"],
        lambda f, t, m: ["distill", "online", m, m, "--data", f, "--heldout", t / "text.txt", "--out", t / "out"],
        lambda f, t, m: ["distill", "online", m, m, "--data", t / "text.txt", "--heldout", f, "--out", t / "out"],
    ],
    ids=["compare-text", "convert-calibration", "convert-fidelity", "heal-text", "heal-heldout", "capture-data", "online-data", "online-heldout"],
)
def test_bad_text_file(tmp_path, capsys, tiny_qwen2, verb, kind):
    (tmp_path / "text.txt").write_text("Some text to measure on. " * 40)
    text = make_file(tmp_path, kind, "text.txt")
    assert_one_line_exit_2(verb(text, tmp_path, tiny_qwen2), capsys, mentions=text)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [*JSONL_KINDS, "text-not-string"])
def test_bad_distill_jsonl_data(tmp_path, capsys, tiny_qwen2, kind):
    data = make_file(tmp_path, "good" if kind == "text-not-string" else kind, "data.jsonl", good=b'{"text": 5}\n')
    assert_one_line_exit_2(["distill", "capture", tiny_qwen2, "--data", data, "--out", tmp_path / "out"], capsys, mentions=data)


@pytest.mark.parametrize("kind", JSONL_KINDS)
def test_bad_generate_input(tmp_path, capsys, tiny_qwen2, kind):
    source = make_file(tmp_path, kind, "in.jsonl")
    assert_one_line_exit_2(["generate", tiny_qwen2, "-i", source, "-o", tmp_path / "out.jsonl"], capsys, mentions=source)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("kind", ["folder", "under-a-file", "same-as-input"])
def test_bad_generate_output(tmp_path, capsys, tiny_qwen2, kind):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "prompt": "Hi"}) + "\n")
    output = {"folder": tmp_path / "answers", "under-a-file": source / "answers.jsonl", "same-as-input": source}[kind]
    if kind == "folder":
        output.mkdir()
    assert_one_line_exit_2(["generate", tiny_qwen2, "-i", source, "-o", output], capsys)
    assert source.read_text() == json.dumps({"id": 1, "prompt": "Hi"}) + "\n"


@pytest.mark.parametrize("kind", ["missing", "folder", "not-utf8", "empty", "json-list"])
def test_bad_chat_conversation(tmp_path, capsys, tiny_qwen2, kind):
    saved = make_file(tmp_path, kind, "conversation.json")
    assert_one_line_exit_2(["chat", tiny_qwen2, "--load", saved], capsys, mentions=saved)


@pytest.mark.parametrize("kind", ["missing", "folder", "not-utf8", "empty", "yaml-list"])
def test_bad_train_config(tmp_path, capsys, kind):
    config = make_file(tmp_path, kind, "train.yaml")
    assert_one_line_exit_2(["train", config, "--show-zones"], capsys, mentions=config)


@pytest.mark.parametrize("kind", ["missing", "folder", "not-utf8", "yaml-list"])
def test_bad_plan_zones(tmp_path, capsys, kind):
    zones = make_file(tmp_path, kind, "zones.yaml")
    assert_one_line_exit_2(["plan", "Qwen3-0.6B", "--mode", "lora", "--zones", zones], capsys, mentions=zones)


@pytest.mark.parametrize("file_name", ["curriculum.yaml", "sft.jsonl"])
def test_bad_curriculum_file(tmp_path, capsys, tiny_qwen2, file_name):
    from qwenforge.train.curriculum import sample_curriculum

    curriculum = tmp_path / "curriculum"
    shutil.copytree(sample_curriculum(), curriculum)
    broken = curriculum / file_name if file_name == "curriculum.yaml" else curriculum / "tokens" / file_name
    broken.write_bytes(NOT_UTF8)
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tiny_qwen2}\ncurriculum: {curriculum}\noutput: {tmp_path / 'run'}\n")
    err = assert_one_line_exit_2(["train", config], capsys)
    assert "not UTF-8" in err and file_name in err


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "not-gguf"])
def test_bad_gguf_file(tmp_path, capsys, kind):
    gguf = make_file(tmp_path, "good" if kind == "not-gguf" else kind, "model.gguf", good=b"GGUF but not really\n")
    assert_one_line_exit_2(["import-gguf", gguf, tmp_path / "out"], capsys, mentions=gguf)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
def test_bad_compare_plot(tmp_path, capsys, tiny_qwen2, kind):
    (tmp_path / "text.txt").write_text("Some text to measure on. " * 40)
    plot = {"folder": tmp_path, "under-a-file": tmp_path / "text.txt" / "plot.png"}[kind]
    assert_one_line_exit_2(["compare", tiny_qwen2, tiny_qwen2, "--text", tmp_path / "text.txt", "--plot", plot], capsys)


@pytest.mark.parametrize("args", [["--max-tokens", "-5"], ["--max-tokens", "0"]])
def test_compare_max_tokens_must_be_positive(tmp_path, capsys, tiny_qwen2, args):
    (tmp_path / "text.txt").write_text("Some text to measure on. " * 40)
    err = assert_one_line_exit_2(["compare", tiny_qwen2, tiny_qwen2, "--text", tmp_path / "text.txt", *args], capsys)
    assert "--max-tokens" in err


def test_compare_a_corrupt_candidate(tmp_path, capsys, tiny_qwen2):
    candidate = tmp_path / "b"
    shutil.copytree(tiny_qwen2, candidate)
    weights = candidate / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "text.txt").write_text("Some text to measure on. " * 40)
    assert_one_line_exit_2(["compare", tiny_qwen2, candidate, "--text", tmp_path / "text.txt"], capsys, mentions=weights)


def test_capture_sequence_length_must_be_positive(tmp_path, capsys, tiny_qwen2):
    (tmp_path / "text.txt").write_text("Some text. " * 40)
    err = assert_one_line_exit_2(["distill", "capture", tiny_qwen2, "--data", tmp_path / "text.txt", "--out", tmp_path / "out", "--sequence-length", "0"], capsys)
    assert "--sequence-length 0" in err


def test_chat_save_to_a_bad_place_keeps_the_session(tmp_path):
    """/save to a folder or an unwritable path prints one line and the conversation goes on."""
    from rich.console import Console

    from qwenforge.infer.chat import Conversation, run_chat

    class Loaded:
        def describe(self):
            return "a stand-in model"

    (tmp_path / "file").write_text("x")
    lines = iter([f"/save {tmp_path}", f"/save {tmp_path / 'file' / 'c.json'}", f"/save {tmp_path / 'ok.json'}", "/exit"])
    console = Console(record=True, width=400)
    conversation = Conversation(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    run_chat(console, Loaded(), conversation, read=lambda prompt: next(lines))
    output = console.export_text()
    assert "is a folder; give a file name for the saved conversation" in output
    assert "cannot write the saved conversation" in output
    assert json.loads((tmp_path / "ok.json").read_text())["messages"][1]["content"] == "Hello"
