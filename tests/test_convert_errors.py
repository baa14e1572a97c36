"""convert on bad input: one clear line (QwenforgeError naming the file), nothing partial left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenforge.checkpoint.safetensors_io import TensorReader, write_state_dict
from qwenforge.convert import convert
from qwenforge.errors import QwenforgeError


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".tmp-{out.name}-*"))


def refuse(source, out, match: str, **options) -> None:
    with pytest.raises(QwenforgeError, match=match) as error:
        convert(source, out, measure=False, **options)
    assert "\n" not in str(error.value)
    assert_nothing_written(out)


def test_truncated_safetensors(tmp_path, tiny_qwen2):
    source = copy_checkpoint(tiny_qwen2, tmp_path / "source")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refuse(source, tmp_path / "out", r"model\.safetensors: not a readable safetensors file", qk_norm="ones")


def test_missing_shard(tmp_path, tiny_qwen2):
    source = tmp_path / "source"
    shutil.copytree(tiny_qwen2, source, ignore=shutil.ignore_patterns("model.safetensors"))
    reader = TensorReader(tiny_qwen2)
    write_state_dict(source, {name: reader.get(name) for name in reader.names()}, max_shard_size="30MB")
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    refuse(source, tmp_path / "out", "shard listed in model.safetensors.index.json is missing", qk_norm="ones")


def test_mismatched_shapes(tmp_path, tiny_qwen2):
    source = copy_checkpoint(tiny_qwen2, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 96
    (source / "config.json").write_text(json.dumps(config))
    refuse(source, tmp_path / "out", r"mlp\.\w+_proj\.weight has shape .* but config\.json implies", qk_norm="ones")


def test_donor_of_another_family(tmp_path, tiny_qwen2, tiny_llama):
    refuse(tiny_qwen2, tmp_path / "out", "donor is a llama model; a donor must be a Qwen3 checkpoint", donor=tiny_llama)


def test_donor_norm_needs_equal_head_dim(tmp_path, tiny_qwen2, tiny_qwen3_untied):
    refuse(tiny_qwen2, tmp_path / "out", "donor head_dim 32 differs from the source's 16", donor=tiny_qwen3_untied, qk_norm="donor")


def test_tokenizer_missing_a_chat_template_token(tmp_path, tiny_qwen2, qwen3_tokenizer_dir):
    tokenizer = copy_checkpoint(qwen3_tokenizer_dir, tmp_path / "tokenizer")
    data = json.loads((tokenizer / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_start|>"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(data))
    refuse(tiny_qwen2, tmp_path / "out", r"chat template uses <\|im_start\|> but the tokenizer has no such token", tokenizer=tokenizer, qk_norm="ones")


def test_existing_output_refused_without_force(tmp_path, tiny_qwen2):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QwenforgeError, match="already exists; choose another output or pass --force"):
        convert(tiny_qwen2, out, qk_norm="ones", measure=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny_qwen2, out, qk_norm="ones", measure=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_pickle_needs_allow_pickle(tmp_path, tiny_qwen2):
    source = tmp_path / "source"
    shutil.copytree(tiny_qwen2, source, ignore=shutil.ignore_patterns("*.safetensors"))
    reader = TensorReader(tiny_qwen2)
    state = {name: reader.get(name) for name in reader.names()}
    torch.save(state, source / "pytorch_model.bin")
    refuse(source, tmp_path / "out", "pickle weights .* pass --allow-pickle", qk_norm="ones")
    convert(source, tmp_path / "out", qk_norm="ones", measure=False, allow_pickle=True)
    converted = TensorReader(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(converted.get(name), state[name])


def test_strict_turns_warnings_into_errors(tmp_path, tiny_qwen2):
    refuse(tiny_qwen2, tmp_path / "out", r"--strict: .*\[qk-norm-ones\]", qk_norm="ones", strict=True)


def test_already_qwen3(tmp_path, tiny_qwen3):
    refuse(tiny_qwen3, tmp_path / "out", "already a Qwen3 checkpoint")


def test_failure_while_writing_leaves_nothing(tmp_path, tiny_qwen2, monkeypatch):
    """A crash mid-stream (here: a disk that fills) leaves neither OUT nor a temp folder."""
    import errno

    from qwenforge.checkpoint import safetensors_io

    calls = {"count": 0}
    original = safetensors_io.ShardedWriter.write_parts  # every tensor, copied or streamed, passes here

    def failing_write(self, name, parts):
        calls["count"] += 1
        if calls["count"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, parts)

    monkeypatch.setattr(safetensors_io.ShardedWriter, "write_parts", failing_write)
    refuse(tiny_qwen2, tmp_path / "out", "disk full while writing", qk_norm="ones")


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_qwen2, tiny_llama):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "convert", str(tiny_qwen2), str(out), "--donor", str(tiny_llama)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "a donor must be a Qwen3 checkpoint" in result.stderr
    assert_nothing_written(out)


def test_cli_dry_run_prints_the_plan(tmp_path, tiny_qwen2):
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "convert", str(tiny_qwen2), str(tmp_path / "out"), "--dry-run", "--qk-norm", "ones", "--drop-bias", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    names = {t["name"]: t for t in plan["tensors"]}
    assert names["model.layers.0.self_attn.q_norm.weight"]["op"] == "ones"
    assert names["model.layers.0.self_attn.q_proj.weight"]["op"] == "copy"
    assert {d["name"] for d in plan["dropped"]} >= {"model.layers.0.self_attn.q_proj.bias"}
    assert not (tmp_path / "out").exists()
