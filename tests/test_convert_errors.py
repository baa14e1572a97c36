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


# --- nothing lost, nothing silently corrupted (issue 18) -------------------------------------------


def test_output_overlapping_an_input_is_refused(tmp_path, tiny_qwen2):
    """`convert SRC SRC --force` used to delete the source; OUT inside SRC and SRC inside OUT too."""
    source = copy_checkpoint(tiny_qwen2, tmp_path / "source")
    (source / "notes.txt").write_text("mine")
    before = sorted(p.name for p in source.iterdir())
    for out in (source, source / "sub", tmp_path):
        with pytest.raises(QwenforgeError, match="overlaps the source .* choose an output folder elsewhere"):
            convert(source, out, qk_norm="ones", measure=False, force=True)
    assert sorted(p.name for p in source.iterdir()) == before and (source / "notes.txt").read_text() == "mine"


def _write_raw_safetensors(file: Path, header, data: bytes) -> None:
    import struct

    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _tampered_source(tmp_path, tiny_qwen2, change) -> Path:
    """A copy of tiny_qwen2 whose single shard header is rewritten by `change(header)`, data untouched."""
    import struct

    source = copy_checkpoint(tiny_qwen2, tmp_path / "source")
    weights = source / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    _write_raw_safetensors(weights, change(header), raw[8 + length :])
    return source


def _first(header) -> str:
    return next(name for name in header if name != "__metadata__")


def _negative(header):
    header[_first(header)]["data_offsets"][0] = -8
    return header


def _overlapping(header):
    names = [name for name in header if name != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    b["data_offsets"] = list(a["data_offsets"])  # b would read a's bytes
    return header


def _reversed(header):
    entry = header[_first(header)]
    entry["data_offsets"] = entry["data_offsets"][::-1]
    return header


def _dtype_lie(dtype):
    def change(header):
        header[_first(header)]["dtype"] = dtype  # same bytes, another element size
        return header

    return change


@pytest.mark.parametrize(
    "change",
    [_negative, _overlapping, _reversed, _dtype_lie("BF16"), _dtype_lie("F64"), lambda header: [header], lambda header: "text"],
    ids=["negative-offset", "overlapping", "reversed", "F32-as-BF16", "F32-as-F64", "json-list", "json-string"],
)
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path, tiny_qwen2, change):
    source = _tampered_source(tmp_path, tiny_qwen2, change)
    refuse(source, tmp_path / "out", r"model\.safetensors: not a readable safetensors file", qk_norm="ones")


def _sharded_source(tmp_path, tiny_qwen2) -> Path:
    source = tmp_path / "source"
    shutil.copytree(tiny_qwen2, source, ignore=shutil.ignore_patterns("model.safetensors"))
    reader = TensorReader(tiny_qwen2)
    write_state_dict(source, {name: reader.get(name) for name in reader.names()}, max_shard_size="30MB")
    return source


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ("outside", "lies outside the checkpoint folder"),
        ("absolute", "lies outside the checkpoint folder"),
        ("list", "'weight_map' must map tensor names to shard file names"),
    ],
)
def test_index_weight_map_outside_the_folder_or_not_a_dict(tmp_path, tiny_qwen2, weight_map, match):
    source = _sharded_source(tmp_path, tiny_qwen2)
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = next(iter(index["weight_map"].values()))
    name = next(iter(index["weight_map"]))
    if weight_map == "outside":
        shutil.copy(source / shard, tmp_path / shard)  # a real file, outside the folder
        index["weight_map"][name] = f"../{shard}"
    elif weight_map == "absolute":
        index["weight_map"][name] = str(tmp_path / shard)
    else:
        index["weight_map"] = list(index["weight_map"].items())
    index_file.write_text(json.dumps(index))
    refuse(source, tmp_path / "out", match, qk_norm="ones")


def test_zero_attention_heads_is_one_line(tmp_path, tiny_qwen2):
    source = copy_checkpoint(tiny_qwen2, tmp_path / "source")
    config = json.loads((source / "config.json").read_text())
    config["num_attention_heads"] = 0
    (source / "config.json").write_text(json.dumps(config))
    refuse(source, tmp_path / "out", r"config\.json: num_attention_heads must be a positive integer, got 0", qk_norm="ones")


def _tokenizer_without_chat_template(tmp_path, tokenizer_dir) -> Path:
    tokenizer = copy_checkpoint(tokenizer_dir, tmp_path / "plain-tokenizer")
    (tokenizer / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    return tokenizer


def test_smoke_test_without_a_chat_template_asks_the_plain_question(tmp_path, tiny_qwen2, qwen25_tokenizer_dir):
    """Base-model tokenizers often have no chat template: the smoke test used to crash and lose OUT."""
    tokenizer = _tokenizer_without_chat_template(tmp_path, qwen25_tokenizer_dir)
    result = convert(tiny_qwen2, tmp_path / "out", tokenizer=tokenizer, qk_norm="ones", fidelity_tokens=64, formats=None)
    assert result["metadata"]["smoke_test"]["prompt"] and "fidelity" in result["metadata"]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_failed_measurement_keeps_the_conversion(tmp_path, tiny_qwen2, monkeypatch):
    from qwenforge.convert import run

    def broken(*args, **kwargs):
        raise ValueError("the check itself broke")

    monkeypatch.setattr(run, "_measure", broken)
    out = tmp_path / "out"
    with pytest.raises(QwenforgeError, match=r"converted and kept, but its measurement failed \(ValueError: the check itself broke\)") as error:
        convert(tiny_qwen2, out, qk_norm="ones")
    assert "\n" not in str(error.value)
    assert TensorReader(out).names() and (out / "config.json").exists()
    record = json.loads((out / "conversion_metadata.json").read_text())
    assert record["measure_error"] == "ValueError: the check itself broke" and "measurement failed" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".tmp-out-*"))


def test_heal_with_a_tokenizer_that_numbers_tokens_otherwise(tmp_path, tiny_qwen2, qwen25_tokenizer_dir):
    """Heal maps the student's ids to the teacher's by token string: a --tokenizer that numbers tokens
    otherwise (was refused) heals like the source's own: linearize is exact, so the healed model agrees."""
    other = copy_checkpoint(qwen25_tokenizer_dir, tmp_path / "other-tokenizer")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["the"] = vocab["the"], vocab["Ġthe"]  # the same strings, other ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "convert", str(tiny_qwen2), str(out), "--tokenizer", str(other), "--qk-norm", "ones", "--no-measure", "--heal", "linearize"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "heal_report.json").read_text())
    assert report["after"]["top1_agreement"] == 1.0 and report["after"]["kl"] < 1e-4 < report["before"]["kl"]


def test_donor_of_another_family_gives_rows_when_its_qk_norm_is_not_taken(tmp_path, tiny_qwen2, tiny_llama):
    """With --qk-norm ones/calibrated the donor only gives its tokenizer and the rows new tokens are projected
    from: a Qwen2/Llama donor (e.g. Qwen2.5 itself, for a transplant to the Qwen2.5 vocabulary) is accepted."""
    result = convert(tiny_llama, tmp_path / "out", donor=tiny_qwen2, qk_norm="ones", measure=False, accept_lossy=True)
    assert result["metadata"]["options"]["new_token_init"] == "donor-projected"
