"""The CLI end to end, as a user runs it: real subprocesses, real exit codes (the demo: test_convert_real)."""

import json
import os
import subprocess
import sys

import pytest

from qwenforge import __version__


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    result = run("spec", "--help")
    assert result.returncode == 0 and "Preset name" in result.stdout


def test_spec_json_of_preset():
    result = run("spec", "Qwen3-32B", "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["architecture"]["family"] == "qwen3" and facts["architecture"]["head_dim"] == 128
    assert facts["parameters"]["total"] == sum(
        facts["parameters"][k] for k in ("embeddings", "attention", "mlp", "norms", "head")
    )


def test_spec_of_folder_and_config_file(tiny_qwen2):
    folder = json.loads(run("spec", str(tiny_qwen2), "--json").stdout)
    single = json.loads(run("spec", str(tiny_qwen2 / "config.json"), "--json").stdout)
    assert folder["parameters"] == single["parameters"]
    assert folder["architecture"]["embedding_rows"] == 152064


def test_spec_list():
    rows = json.loads(run("spec", "--list", "--json").stdout)
    assert {row["preset"] for row in rows} >= {"Qwen2.5-72B-Instruct", "QwQ-32B", "Qwen3-0.6B", "Qwen3-72B-Instruct"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["spec", "Qwen2.5-72b"], "did you mean Qwen2.5-72B-Instruct"),
        (["spec", "/no/such/folder"], "no such file, folder or preset"),
        (["spec"], "spec needs a MODEL"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_and_partial_config(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    result = run("spec", str(tmp_path / "broken"))
    assert result.returncode == 2 and "malformed JSON" in result.stderr
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    result = run("spec", str(partial))
    assert result.returncode == 2 and "missing" in result.stderr
    unsupported = tmp_path / "mamba.json"
    unsupported.write_text(json.dumps({"model_type": "mamba"}))
    result = run("spec", str(unsupported))
    assert result.returncode == 2 and "unsupported architecture" in result.stderr


def test_debug_keeps_the_traceback():
    result = run("--debug", "spec", "/no/such/folder")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_corrupt_gguf_via_cli(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    result = run("spec", str(bad))
    assert result.returncode == 2 and "GGUF" in result.stderr and "Traceback" not in result.stderr
