"""distill: logit store capture/resume/damage, training from the store, online distillation, init-student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenforge.distill import engine, store
from qwenforge.distill.capture import capture
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
    capture(teacher, DATA / "calibration.txt", out, k=16, sequence_length=64, shard_sequences=4)
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
    assert index["complete"] and index["k"] == 16 and len(index["shards"]) >= 2 and index["compression"] == "zlib"
    assert index["naive_bytes_per_token"] == 16 * (4 + 2) + 4  # 151,936 ids need int32
    assert index["bytes_per_token"] < index["naive_bytes_per_token"]
    assert (captured / "tokenizer" / "tokenizer.json").exists()
    shards = list(store.iterate_store(captured, index))
    ids, indices, logprobs = (torch.cat(part) for part in zip(*shards))
    model = _load(teacher)
    with torch.no_grad():
        expected = torch.log_softmax(model(ids[:1, :-1]).logits.float(), -1).topk(16, -1)
    assert torch.equal(indices[0].sort(-1).values, expected.indices[0].sort(-1).values)  # float16 ties may swap ranks
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
    import shutil

    copy = tmp_path / "logits"
    shutil.copytree(captured, copy)
    index = json.loads((copy / "index.json").read_text())
    last = index["shards"].pop()
    index["complete"] = False
    (copy / "index.json").write_text(json.dumps(index))  # as if killed before the last shard
    (copy / last["file"]).unlink()
    with pytest.raises(QwenforgeError, match="unfinished"):
        store.open_store(copy)
    with pytest.raises(QwenforgeError, match="already exists"):
        capture(teacher, DATA / "calibration.txt", copy, k=16, sequence_length=64, shard_sequences=4)
    with pytest.raises(QwenforgeError, match="differs in k"):
        capture(teacher, DATA / "calibration.txt", copy, k=8, sequence_length=64, shard_sequences=4, resume=True)
    resumed = capture(teacher, DATA / "calibration.txt", copy, k=16, sequence_length=64, shard_sequences=4, resume=True)
    assert resumed["complete"] and (copy / last["file"]).read_bytes() == (captured / last["file"]).read_bytes()
    with open(copy / last["file"], "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(QwenforgeError, match="truncated"):
        list(store.iterate_store(copy, store.open_store(copy)))


def test_train_from_store_lowers_heldout_kl(student, captured, tmp_path):
    out = tmp_path / "distilled"
    options = DistillOptions(steps=8, eval_every=4, batch_size=2, learning_rate=3e-3, heldout_sequences=2, threads=1)
    report = train_from_store(student, captured, out, options)
    assert report["best"]["kl"] < report["before"]["kl"]
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors", "distill_report.json", "distill_curve.png",
                                               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert not engine.progress_folder(out, "distill").exists()  # the resume state goes once OUT is written


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
    assert json.loads(result.stdout)["naive_bytes_per_token"] == 8 * 5 + 4
    result = runner.invoke(app, ["distill", "init-student", str(teacher), str(tmp_path / "s"), "--keep-layers", "first:1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1


def test_store_layouts_decode_to_the_same_entries(captured):
    """zlib/lzma (id-sorted gaps, byte planes) hold exactly what the plain layout holds, in fewer bytes."""
    index = store.open_store(captured)
    ids, indices, logprobs = next(store.iterate_store(captured, index))
    for encoding in store.VALUE_ENCODINGS:
        decoded, sizes = {}, {}
        for compression in store.COMPRESSIONS:
            tensors, metadata = store.encode_shard(ids, indices, logprobs, index["vocab_size"], encoding, compression)
            sizes[compression] = sum(t.numel() * t.element_size() for t in tensors.values())
            got_ids, got_indices, got_logprobs = store.decode_shard(tensors, metadata, {"values": encoding, "compression": compression})
            assert (got_logprobs[..., :-1] >= got_logprobs[..., 1:]).all()  # rank order, highest first
            order = got_indices.argsort(-1)  # compare by token: ties in the stored values may order ranks differently
            decoded[compression] = (got_ids, got_indices.gather(-1, order), got_logprobs.gather(-1, order))
        for compression in ("zlib", "lzma"):
            for got, want in zip(decoded[compression], decoded["none"]):
                assert torch.equal(got, want)
            assert sizes[compression] < 0.8 * sizes["none"]


def test_train_resume_continues_from_the_saved_step(student, captured, tmp_path, monkeypatch):
    """A run killed after its step-4 checkpoint, resumed, ends exactly where an uninterrupted run ends."""
    options = DistillOptions(steps=8, eval_every=4, batch_size=2, learning_rate=3e-3, heldout_sequences=2, threads=1, patience=10)
    whole = train_from_store(student, captured, tmp_path / "whole", options)
    real, calls = engine.distillation_loss, []

    def dies_at_step_six(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "distillation_loss", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        train_from_store(student, captured, tmp_path / "parts", options)
    monkeypatch.setattr(engine, "distillation_loss", real)
    assert json.loads((engine.progress_folder(tmp_path / "parts", "distill") / "state.json").read_text())["step"] == 4
    with pytest.raises(QwenforgeError, match="--resume"):
        train_from_store(student, captured, tmp_path / "parts", options)
    resumed = train_from_store(student, captured, tmp_path / "parts", options, resume=True)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    assert [row["step"] for row in resumed["history"]] == [0, 4, 8]
    for got, want in zip(resumed["history"], whole["history"]):
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "parts" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(QwenforgeError, match="no checkpoint"):
        train_from_store(student, captured, tmp_path / "other", options, resume=True)


def test_another_vocabulary_maps_by_token_string(captured, tiny_qwen2, tmp_path):
    """A Qwen2.5-tokenizer student on a Qwen3-tokenizer store: same splits, 4 added tokens apart."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    index = store.open_store(captured, tokenizer)
    assert 0.99 < index["student_map"]["coverage"] <= 1.0 and index["student_map"]["checked_sequences"] > 0
    raw = list(store.iterate_store(captured, store.open_store(captured)))
    vocab = tokenizer.get_vocab()
    teacher_vocab = {i: t for t, i in AutoTokenizer.from_pretrained(captured / "tokenizer").get_vocab().items()}
    for (ids, indices, logprobs), (raw_ids, raw_indices, raw_logprobs) in zip(store.iterate_store(captured, index), raw):
        assert ids.tolist() == [[vocab[teacher_vocab[i]] for i in row] for row in raw_ids.tolist()]
        present = torch.isfinite(logprobs)
        assert present.float().mean() > 0.99 and (logprobs[..., :-1] >= logprobs[..., 1:]).all()
        assert torch.equal(logprobs.exp().nan_to_num().sum(-1) <= raw_logprobs.exp().sum(-1) + 1e-6, torch.ones_like(present[..., 0]))
    with pytest.raises(QwenforgeError, match=r"covers 9\d\.\d+% of the teacher's top-k mass, below --min-coverage"):
        store.open_store(captured, tokenizer, min_coverage=0.99999)
    report = train_from_store(tiny_qwen2, captured, None, DistillOptions(steps=4, eval_every=2, batch_size=2, learning_rate=3e-3, heldout_sequences=2, threads=1))
    assert report["store"]["student_map"]["coverage"] > 0.99 and report["best"]["kl"] < report["before"]["kl"]


def test_a_student_that_splits_text_differently_is_refused(captured, tiny_other_vocab):
    from transformers import AutoTokenizer

    with pytest.raises(QwenforgeError, match="splits the captured text differently"):
        store.open_store(captured, AutoTokenizer.from_pretrained(tiny_other_vocab))


def test_topk_divergence_with_absent_entries_is_finite():
    logits = torch.randn(3, 50, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(3, 50), -1).topk(8, -1)
    values = teacher.values.clone()
    values[:, -2:] = float("-inf")  # tokens the student lacks
    for kind in engine.DIVERGENCES:
        loss = engine.topk_divergence(logits, teacher.indices, values, kind, temperature=2.0).mean()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        logits.grad = None


def test_vllm_prompt_logprobs_become_store_tensors(teacher, tmp_path):
    """Our conversion of vLLM's documented structure (vLLM itself is not installed here)."""
    from dataclasses import dataclass

    from qwenforge.distill.vllm_engine import prompt_logprobs_to_topk

    @dataclass
    class Logprob:  # vllm.logprobs.Logprob's fields
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None

    torch.manual_seed(0)
    full = torch.log_softmax(torch.randn(5, 40) * 3, -1)  # positions 1..5 of a 6-token prompt
    prompt = [3, 7, 1, 9, 0, 2]
    structure = [None]
    for position, row in enumerate(full):
        ranked = row.argsort(descending=True).tolist()
        entry = {token: Logprob(float(row[token]), rank + 1) for rank, token in enumerate(ranked[:4])}
        actual = prompt[position + 1]  # the prompt's own token rides along, whatever its rank
        entry[actual] = Logprob(float(row[actual]), ranked.index(actual) + 1)
        structure.append(dict(reversed(list(entry.items()))))
    indices, values = prompt_logprobs_to_topk(structure, 4)
    expected = full.topk(4, -1)
    assert torch.equal(indices, expected.indices) and torch.allclose(values, expected.values)
    with pytest.raises(QwenforgeError, match="fewer than --k 6"):
        prompt_logprobs_to_topk(structure, 6)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(QwenforgeError, match="vLLM is not installed"):
            capture(teacher, DATA / "heldout.txt", tmp_path / "v", k=4, sequence_length=64, engine_name="vllm")


def test_distill_train_under_accelerate_launch_two_gloo_processes(student, captured, tmp_path):
    """The shipped DDP config, two CPU processes: both train in step, only the main one writes and prints."""
    import os
    import socket
    import subprocess
    import sys

    import qwenforge.train

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ddp = Path(qwenforge.train.__file__).parent / "accelerate" / "ddp.yaml"
    out = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ddp), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(port),
        "-m", "qwenforge.cli", "distill", "train", str(student), "--logits", str(captured), "--out", str(out), "--steps", "4", "--lr", "3e-3",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote") == 1, done.stdout  # only the main process reports
    report = json.loads((out / "distill_report.json").read_text())
    assert report["processes"] == 2 and report["tokens_trained"] == 4 * 4 * 2 * 64  # steps x batch x processes x length
    first, second = report["rank_fingerprints"]
    assert first == second  # both ranks hold the same weights
    assert report["best"]["kl"] < report["before"]["kl"] and not engine.progress_folder(out, "distill").exists()


def test_cli_distill_train_resume_without_checkpoint_is_one_line(student, captured, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "qwenforge.cli", "distill", "train", str(student), "--logits", str(captured), "--out", str(tmp_path / "o"), "--resume", "--min-coverage", "0.9"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no checkpoint to resume" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_online_with_another_vocabulary_points_to_the_store(teacher, tiny_qwen2):
    with pytest.raises(QwenforgeError, match="distill capture"):
        train_online(teacher, tiny_qwen2, DATA / "calibration.txt", DATA / "heldout.txt", None)


def test_online_teacher_that_does_not_fit_is_refused_with_the_way_out(teacher, student):
    from qwenforge.devices import GIB
    options = DistillOptions(steps=1)
    estimate = engine.memory_estimate(teacher, student, 151_936, options.eval_tokens, options, full_student=True)
    assert estimate["teacher"] > estimate["student"] / 4 > 0
    with pytest.raises(QwenforgeError, match="distill capture.*--logits STORE"):
        train_online(teacher, student, DATA / "calibration.txt", DATA / "heldout.txt", None, DistillOptions(steps=1, memory_gb=estimate["total"] / 2 / GIB))


def test_rebuilt_distribution_ignores_absent_entries():
    """An absent entry (-inf, a token the student lacks) that points at a listed id never overwrites it."""
    indices = torch.tensor([[0, 3, 0]])  # the third entry is absent and, as mapping.py leaves it, points at id 0
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2), float("-inf")]])
    rebuilt = store.rebuilt_logprobs(indices, logprobs, 10).exp()[0]
    assert torch.isclose(rebuilt[0], torch.tensor(0.5)) and torch.isclose(rebuilt[3], torch.tensor(0.2))
    assert torch.allclose(rebuilt[[1, 2, 4, 5, 6, 7, 8, 9]], torch.tensor(0.3 / 8))


def test_teacher_samples_are_continuations_without_their_prompts(tiny_other_vocab):
    """The prompts are windows of the healing text; kept in the samples they repeated that text about
    twelve times over and a vocabulary heal learned it by heart. Only the continuations come back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenforge.distill.samples import NEW_TOKENS, PROMPT_TOKENS, sample_text
    from qwenforge.files import default_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_other_vocab)
    model = AutoModelForCausalLM.from_pretrained(tiny_other_vocab).eval()
    text = default_text("calibration.txt").read_text()
    texts = sample_text(model, tokenizer, text, 3 * NEW_TOKENS, seed=0)
    assert len(texts) == 3 and all(texts)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [tokenizer.decode(ids[start : start + PROMPT_TOKENS // 2]) for start in range(0, len(ids) - PROMPT_TOKENS // 2, 8)]
    assert not any(window in sample for sample in texts for window in windows)
    assert texts == sample_text(model, tokenizer, text, 3 * NEW_TOKENS, seed=0)  # a resumed heal reads the same text


def test_a_new_tokens_mass_counts_for_its_first_piece():
    """Teacher pieces ".", "set", "x"; the student also has ".set" whole and a padding row with no text.
    Over the teacher's pieces, a student sure of ".set" agrees with a teacher sure of "."; the KL on the
    shared tokens alone cannot see ".set" at all, and its gradient never reaches that row."""
    from qwenforge.distill.teacher import Vocabulary

    spellings = {3: [0, 1], 4: []}
    vocabulary = Vocabulary(torch.arange(3), torch.arange(3), torch.tensor([0, 1, 2, -1, -1]), spellings.__getitem__)
    assert vocabulary.first_pieces.tolist() == [0, 1, 2, 0, -1]
    teacher = torch.tensor([[[9.0, 0.0, 0.0]]])  # "." nearly sure
    sure_of_new = torch.tensor([[[0.0, 0.0, 0.0, 12.0, 0.0]]], requires_grad=True)
    agree = engine.piece_divergence(sure_of_new, teacher, vocabulary.first_pieces)
    assert agree.item() < 0.01
    on_x = torch.tensor([[[0.0, 0.0, 9.0, 0.0, 0.0]]], requires_grad=True)
    disagree = engine.piece_divergence(on_x, teacher, vocabulary.first_pieces)
    assert disagree.item() > 5
    disagree.sum().backward()
    assert on_x.grad[0, 0, 3] < 0 and on_x.grad[0, 0, 0] < 0  # raising "." or ".set" both lower it
    assert on_x.grad[0, 0, 4] > 0  # a padding row is pushed down: the teacher puts nothing there


def test_samples_open_kinds_of_text_the_healing_text_lacks(tiny_other_vocab):
    """A quarter of the prompts are windows of the healing text, the rest the openers in turn."""
    from transformers import AutoTokenizer

    from qwenforge.distill.samples import OPENER_SHARE, OPENERS, sample_prompts
    from qwenforge.files import default_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_other_vocab)
    text = default_text("calibration.txt").read_text()
    prompts = [tokenizer.decode(p) for p in sample_prompts(tokenizer, text, 32)]
    opened = round(32 * OPENER_SHARE)
    assert 0 < opened < 32 and prompts[32 - opened :] == [OPENERS[i % len(OPENERS)] for i in range(opened)]
    assert all(window in text for window in prompts[: 32 - opened]) and len(set(prompts[: 32 - opened])) == 32 - opened
