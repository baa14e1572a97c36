"""distill: logit store capture/resume/damage, training from the store, online distillation, init-student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenforge.distill import store
from qwenforge.distill.init_student import init_student, parse_keep_layers
from qwenforge.distill.train import DistillOptions, train_from_store, train_online
from qwenforge.errors import QwenforgeError

DATA = Path(__file__).parents[1] / "src" / "qwenforge" / "data"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A tiny 4-layer Qwen3 with peaked distributions (large init), a teacher worth imitating."""
    from qwenforge.fixtures.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("distill") / "teacher", qwen3_tokenizer_dir, num_hidden_layers=4, initializer_range=0.2)


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("distill") / "student"
    init_student(teacher, out, "half")
    return out


@pytest.fixture(scope="module")
def captured(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("distill") / "logits"
    store.capture(teacher, DATA / "calibration.txt", out, k=16, sequence_length=64, shard_sequences=4)
    return out


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_init_student_keeps_the_chosen_layers(teacher, student):
    assert parse_keep_layers("half", 4) == [0, 2, 3]
    assert parse_keep_layers("0,2-3", 4) == [0, 2, 3] and parse_keep_layers("first:2", 4) == [0, 1]
    with pytest.raises(QwenforgeError, match="keep-layers"):
        parse_keep_layers("0,9", 4)
    big, small = _load(teacher), _load(student)
    assert small.config.num_hidden_layers == 3
    torch.testing.assert_close(small.model.layers[1].self_attn.q_proj.weight, big.model.layers[2].self_attn.q_proj.weight)
    torch.testing.assert_close(small.model.layers[2].mlp.down_proj.weight, big.model.layers[3].mlp.down_proj.weight)
    assert json.loads((student / "student_recipe.json").read_text())["keep_layers"] == [0, 2, 3]


def test_capture_writes_a_sharded_indexed_store(teacher, captured):
    index = json.loads((captured / "index.json").read_text())
    assert index["complete"] and index["k"] == 16 and len(index["shards"]) >= 2
    assert index["bytes_per_token"] == 16 * (4 + 2)  # 151,936 ids need int32
    shards = list(store.iterate_store(captured, index))
    ids, indices, logprobs = (torch.cat(part) for part in zip(*shards))
    model = _load(teacher)
    with torch.no_grad():
        expected = torch.log_softmax(model(ids[:1, :-1]).logits.float(), -1).topk(16, -1)
    assert torch.equal(indices[0], expected.indices[0])
    torch.testing.assert_close(logprobs[0], expected.values[0], atol=2e-3, rtol=1e-3)


def test_store_encodings_and_reconstruction():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    logprobs = torch.log_softmax(logits, -1)
    values, indices = logprobs.topk(32, -1)
    for encoding, relative in (("float16", 1e-3), ("uint8", 0.05)):
        decoded = store.decode_values(store.encode_values(values, encoding), encoding)
        assert ((decoded - values).abs() <= relative * values.abs().clamp(min=1)).all()
    small = store.decode_indices(store.encode_indices(torch.tensor([0, 40000, 65535]), 65536))
    assert small.tolist() == [0, 40000, 65535] and store.encode_indices(torch.tensor([1]), 65536).dtype == torch.int16
    kl = [float(store.reconstruction_kl(logits, *reversed(logprobs.topk(k, -1))).mean()) for k in (8, 32, 128)]
    assert kl[0] > kl[1] > kl[2] >= 0


def test_capture_resumes_and_refuses_damage(teacher, captured, tmp_path):
    copy = tmp_path / "logits"
    copy.mkdir()
    for item in captured.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    index = json.loads((copy / "index.json").read_text())
    last = index["shards"].pop()
    index["complete"] = False
    (copy / "index.json").write_text(json.dumps(index))  # as if killed before the last shard
    (copy / last["file"]).unlink()
    with pytest.raises(QwenforgeError, match="unfinished"):
        store.open_store(copy)
    with pytest.raises(QwenforgeError, match="already exists"):
        store.capture(teacher, DATA / "calibration.txt", copy, k=16, sequence_length=64, shard_sequences=4)
    with pytest.raises(QwenforgeError, match="differs in k"):
        store.capture(teacher, DATA / "calibration.txt", copy, k=8, sequence_length=64, shard_sequences=4, resume=True)
    resumed = store.capture(teacher, DATA / "calibration.txt", copy, k=16, sequence_length=64, shard_sequences=4, resume=True)
    assert resumed["complete"] and (copy / last["file"]).read_bytes() == (captured / last["file"]).read_bytes()
    with open(copy / last["file"], "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(QwenforgeError, match="truncated"):
        list(store.iterate_store(copy, store.open_store(copy)))


def test_train_from_store_lowers_heldout_kl(student, captured, tmp_path, qwen25_tokenizer_dir):
    out = tmp_path / "distilled"
    options = DistillOptions(steps=8, eval_every=4, batch_size=2, learning_rate=3e-3, heldout_sequences=2, threads=1)
    report = train_from_store(student, captured, out, options)
    assert report["best"]["kl"] < report["before"]["kl"]
    assert {"config.json", "model.safetensors", "distill_report.json", "distill_curve.png"} <= {p.name for p in out.iterdir()}
    from transformers import AutoTokenizer

    with pytest.raises(QwenforgeError, match="another tokenizer"):
        store.open_store(captured, AutoTokenizer.from_pretrained(qwen25_tokenizer_dir))


def test_online_distillation_beats_cross_entropy_on_kl(teacher, student):
    base = dict(steps=6, eval_every=3, batch_size=2, sequence_length=48, learning_rate=3e-3, lora_rank=4, eval_tokens=97, threads=1)
    distilled = train_online(teacher, student, DATA / "calibration.txt", DATA / "heldout.txt", None, DistillOptions(**base))
    plain = train_online(teacher, student, DATA / "calibration.txt", DATA / "heldout.txt", None, DistillOptions(**base, ce_weight=1.0))
    assert distilled["best"]["kl"] < distilled["before"]["kl"]
    assert distilled["best"]["kl"] < plain["best"]["kl"]


def test_cli_distill_capture_and_init_student(teacher, tmp_path):
    from qwenforge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["distill", "capture", str(teacher), "--data", str(DATA / "heldout.txt"), "--out", str(tmp_path / "l"), "--k", "8", "--values", "uint8", "--sequence-length", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes_per_token"] == 8 * 5
    result = runner.invoke(app, ["distill", "init-student", str(teacher), str(tmp_path / "s"), "--keep-layers", "first:1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1
