"""The `qwenforge train` verb end to end: --print-config, data errors before any model loads, a run, merge."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from qwenforge.cli import app
from qwenforge.fixtures.tiny import build_tiny_checkpoint

runner = CliRunner()


def test_print_config_without_a_file_is_a_loadable_example(tmp_path):
    result = runner.invoke(app, ["train", "--print-config"])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    assert data["lora"]["preset"] == "conservative" and data["sft"]["packing"] is False
    assert [z["layers"] for z in data["zones"]] == [[0.0, 0.25], [0.25, 0.75], [0.75, 1.0]]


def test_missing_config_and_bad_data_are_one_line_errors(tmp_path):
    from qwenforge.cli import main  # noqa: F401  (errors reach the user through main's handler)

    result = runner.invoke(app, ["train"])
    assert result.exit_code != 0
    (tmp_path / "curriculum.yaml").write_text("topics: [one]\n")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "sft.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "t.yaml").write_text(f"model: /nonexistent\noutput: {tmp_path / 'out'}\ncurriculum: {tmp_path}\n")
    result = runner.invoke(app, ["train", str(tmp_path / "t.yaml")])
    assert "sft.jsonl:1: expected" in str(result.exception)  # the data is checked before the model is looked at
    assert not (tmp_path / "out").exists()


def test_train_then_merge_from_the_command_line(tmp_path, qwen25_tokenizer_dir):
    model = build_tiny_checkpoint("qwen2", tmp_path / "model", qwen25_tokenizer_dir)
    (tmp_path / "c" / "one").mkdir(parents=True)
    (tmp_path / "c" / "curriculum.yaml").write_text("topics: [one]\n")
    line = {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "Picture a bench."}]}
    (tmp_path / "c" / "one" / "sft.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "t.yaml").write_text(
        f"model: {model}\ncurriculum: c\noutput: run\nsft: {{max_steps: 1, batch_size: 1, max_seq_length: 64}}\n"
    )
    result = runner.invoke(app, ["train", str(tmp_path / "t.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["topics"][0]["sft"]["steps"] == 1 and summary["topics"][0]["dpo"] is None
    result = runner.invoke(app, ["train", "merge", str(tmp_path / "run"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").exists() or (tmp_path / "merged" / "model.safetensors.index.json").exists()
    result = runner.invoke(app, ["train", "merge", str(tmp_path / "run"), str(tmp_path / "merged")])
    assert "already exists" in str(result.exception)


def test_qlora_without_bitsandbytes_or_gpu_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    import pytest

    from qwenforge.errors import QwenforgeError
    from qwenforge.train.backends import pytorch

    (tmp_path / "t.yaml").write_text(f"model: embedded\noutput: {tmp_path / 'out'}\nquantization: nf4\n")
    result = runner.invoke(app, ["train", str(tmp_path / "t.yaml")])
    assert isinstance(result.exception, QwenforgeError)
    message = str(result.exception)
    assert "\n" not in message and "t.yaml: quantization: nf4 needs" in message
    assert ("bitsandbytes" in message) if importlib.util.find_spec("bitsandbytes") is None else ("CUDA GPU" in message)
    assert not (tmp_path / "out").exists()  # refused before anything is written

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(QwenforgeError, match="nf4 needs a CUDA GPU"):
        pytorch.check_nf4("t.yaml")
