"""The streaming shard writer produces files stock safetensors reads, and bad files fail clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenforge.checkpoint.folder import atomic_output
from qwenforge.checkpoint.safetensors_io import INDEX_NAME, TensorReader, list_tensors, parse_size, write_state_dict
from qwenforge.errors import QwenforgeError


def sample_state():
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32),
        "b.weight": torch.randn(128, 16).to(torch.bfloat16),
        "c.bias": torch.randn(7).to(torch.float16),
        "d.ids": torch.arange(10, dtype=torch.int64),
    }


def test_sharded_roundtrip_with_stock_reader(tmp_path):
    state = sample_state()
    files = write_state_dict(tmp_path, state, max_shard_size=9000)
    assert len(files) > 1 and (tmp_path / INDEX_NAME).exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(state)
    loaded = {}
    for file in files:
        loaded.update(load_file(tmp_path / file))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    reader = TensorReader(tmp_path)
    assert torch.equal(reader.get("b.weight"), state["b.weight"])


def test_single_file_when_small(tmp_path):
    assert write_state_dict(tmp_path, sample_state()) == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    save_file(sample_state(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(QwenforgeError, match="not a readable safetensors file"):
        list_tensors(tmp_path)


def test_missing_shard_is_a_clear_error(tmp_path):
    write_state_dict(tmp_path, sample_state(), max_shard_size=9000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(QwenforgeError, match="missing"):
        list_tensors(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(QwenforgeError, match="safetensors only"):
        list_tensors(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size(123) == 123
    with pytest.raises(QwenforgeError):
        parse_size("lots")


def test_atomic_output_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as temp:
            (temp / "x").write_text("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(out) as temp:
        (temp / "x").write_text("done")
    assert (out / "x").read_text() == "done"
    with pytest.raises(QwenforgeError, match="--force"):
        with atomic_output(out):
            pass
    with atomic_output(out, force=True) as temp:
        (temp / "y").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    code = (
        "import os, signal, sys; from qwenforge.checkpoint.folder import atomic_output\n"
        f"with atomic_output({str(out)!r}) as temp:\n"
        "    (temp / 'shard').write_bytes(b'x' * 1000); print('ready', flush=True); signal.pause()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    live = list(tmp_path.glob(".tmp-out-*"))
    with atomic_output(tmp_path / "other"):  # another output: never touches out's folder
        pass
    assert list(tmp_path.glob(".tmp-out-*")) == live and len(live) == 1
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(tmp_path.glob(".tmp-out-*")) == live  # the kill leaves it: nothing looks complete
    assert not out.exists()
    with atomic_output(out) as temp:
        (temp / "shard").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert [p.name for p in out.iterdir()] == ["shard"]


def test_copied_spans_interleave_with_streamed_parts(tmp_path):
    """In-kernel copies of unchanged tensors and ordinary writes produce one valid file."""
    from qwenforge.checkpoint.mapped_reader import MappedReader
    from qwenforge.checkpoint.safetensors_io import ShardedWriter

    source = tmp_path / "source"
    source.mkdir()
    state = sample_state()
    write_state_dict(source, state, max_shard_size=9000)
    reader = MappedReader(source)
    out = tmp_path / "out"
    out.mkdir()
    entries = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    writer = ShardedWriter(out, entries, max_shard_size=12000)
    for index, (name, tensor) in enumerate(state.items()):
        if index % 2 == 0:
            writer.write_parts(name, [reader.span(name)])
        else:
            file, offset, nbytes = reader.span(name)  # first half copied, second half streamed
            half = tensor.reshape(-1)[: tensor.numel() // 2]
            writer.write_parts(name, [(file, offset, half.numel() * half.element_size()), tensor.reshape(-1)[tensor.numel() // 2 :]])
    writer.close()
    loaded = {}
    for file in writer.files:
        loaded.update(load_file(out / file))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
