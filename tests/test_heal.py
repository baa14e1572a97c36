"""heal: divergences, closed-form linearization, layer-wise + global healing, refusals, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenforge.distill import engine
from qwenforge.errors import QwenforgeError
from qwenforge.heal import PROJECTIONS, HealOptions, heal, linearize_qk_norms, merge_low_rank, trainable_parameters

DATA = Path(__file__).parents[1] / "src" / "qwenforge" / "data"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    """A tiny Llama with sharp attention (large init), so dropping into Qwen3's q/k-norm visibly costs fidelity."""
    from qwenforge.fixtures.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("heal") / "llama", qwen25_tokenizer_dir, initializer_range=0.2)


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama converted to Qwen3 by the converter (calibrated q/k norms)."""
    from qwenforge.convert.run import convert

    out = tmp_path_factory.mktemp("heal") / "converted"
    convert(tiny_llama, out, measure=False)
    return out


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _quick(**overrides) -> HealOptions:
    base = dict(steps=8, eval_every=4, sequence_length=48, batch_size=2, heal_tokens=200, eval_tokens=100, threads=1, formats=None)  # formats: where a test asks
    return HealOptions(**{**base, **overrides})


def test_divergences_agree_with_their_definitions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 50), torch.randn(5, 50)
    for kind in engine.DIVERGENCES:
        assert engine.full_divergence(teacher, teacher, kind).abs().max() < 1e-5
        assert (engine.full_divergence(student, teacher, kind) > 0).all()
    forward = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=teacher), torch.distributions.Categorical(logits=student))
    torch.testing.assert_close(engine.full_divergence(student, teacher, "forward"), forward)
    torch.testing.assert_close(engine.full_divergence(student, teacher, "jsd"), engine.full_divergence(teacher, student, "jsd"))
    assert engine.full_divergence(student, teacher, "tvd").max() <= 1
    # top-k with the whole vocabulary is the full divergence; a smaller k keeps the tail explicit
    logprobs, indices = torch.log_softmax(teacher, -1).topk(50, -1)
    torch.testing.assert_close(engine.topk_divergence(student, indices, logprobs, "forward"), forward, atol=1e-4, rtol=1e-4)
    logprobs8, indices8 = torch.log_softmax(teacher, -1).topk(8, -1)
    assert (engine.topk_divergence(student, indices8, logprobs8, "forward") > 0).all()
    assert engine.topk_divergence(teacher, indices8, logprobs8, "forward").abs().max() < 1e-5


def test_linearize_makes_the_converted_model_equal_its_source(tiny_llama, tiny_converted):
    source, converted = _load(tiny_llama), _load(tiny_converted)
    ids = torch.randint(0, 1000, (1, 40))
    shared = slice(0, 151643)  # the byte-level BPE tokens; the converter re-initialises the rows after them
    assert not torch.allclose(source(ids).logits[..., shared], converted(ids).logits[..., shared], atol=1e-3)
    scales = linearize_qk_norms(converted)
    assert scales["largest_scale"] < 1
    torch.testing.assert_close(converted(ids).logits[..., shared], source(ids).logits[..., shared], atol=2e-4, rtol=1e-3)


def test_lora_merges_into_a_plain_checkpoint(tiny_converted):
    model = _load(tiny_converted)
    named = trainable_parameters(model, "norms+qk-lora", lora_rank=4)
    assert any(name.endswith(".B") for name in named) and all(p.requires_grad for p in named.values())
    with torch.no_grad():
        for name, parameter in named.items():
            if name.endswith(".B"):
                parameter.normal_()
    ids = torch.randint(0, 1000, (1, 16))
    expected = model(ids).logits
    merge_low_rank(model)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in trainable_parameters(_load(tiny_converted), "norms").values()) == 2 * 2 * 32


def test_heal_lowers_heldout_kl_and_writes_a_plain_qwen3_folder(tiny_llama, tiny_converted, tmp_path):
    out = tmp_path / "healed"
    report = heal(tiny_converted, out, tiny_llama, _quick(train="norms+qk-lora", method="layerwise+global", lora_rank=4))
    assert report["after"]["kl"] < report["before"]["kl"]
    assert report["trainable_parameters"] > 2 * 2 * 32
    assert set(report["phases"]) == {"layerwise", "global"}
    written = {p.name for p in out.iterdir()}
    assert written == {"config.json", "model.safetensors", "generation_config.json", "heal_report.json", "heal_kl.png", "tokenizer.json", "tokenizer_config.json",
                       "chat_template.jinja", "conversion_metadata.json", "config_diff.json", "README.md"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert not any("lora" in n or "parametrizations" in n or n.endswith(".A") for n in names)
    healed = _load(out)
    assert type(healed).__name__ == "Qwen3ForCausalLM"
    saved = json.loads((out / "heal_report.json").read_text())
    assert saved["after"]["kl"] == pytest.approx(report["after"]["kl"])
    assert not list(tmp_path.glob(".heal-work-*"))


def test_heal_global_attention_and_resume(tiny_llama, tiny_converted, tmp_path):
    out = tmp_path / "healed"
    report = heal(tiny_converted, out, tiny_llama, _quick(train="attention", method="global", steps=8))
    assert report["after"]["kl"] < report["before"]["kl"] and report["phases"]["global"]["best_step"] > 0  # step 0 is not the best
    assert report["phases"]["global"]["steps"] >= 4
    # a finished phase left in the work folder is picked up by --resume instead of retrained
    work = tmp_path / ".heal-work-again"
    work.mkdir()
    history = report["phases"]["global"]["history"]
    healed = _load(out)
    named = trainable_parameters(healed, "attention")
    finished = {"step": 8, "seconds": 1.0, "history": history, "optimizer": {"state": {}, "param_groups": []},
                "best_state": {n: p.detach() for n, p in named.items()}}
    engine.save_progress(work / "global", named, finished, {"done": True})
    resumed = heal(tiny_converted, tmp_path / "again", tiny_llama, _quick(train="attention", method="global", steps=8), resume=True)
    assert resumed["phases"]["global"]["stopped"] == "resumed"
    assert resumed["after"]["kl"] == pytest.approx(report["after"]["kl"], rel=1e-4)


def test_heal_refusals(tiny_llama, tiny_converted, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(QwenforgeError, match="already exists"):
        heal(tiny_converted, tmp_path / "exists", tiny_llama, _quick())
    with pytest.raises(QwenforgeError, match="same text"):
        heal(tiny_converted, tmp_path / "o", tiny_llama, _quick(text=str(DATA / "heldout.txt")))
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(QwenforgeError, match="tokens"):
        heal(tiny_converted, tmp_path / "o", tiny_llama, _quick(text=str(short)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(QwenforgeError, match="empty.txt: the healing text is empty"):
        heal(tiny_converted, tmp_path / "o", tiny_llama, _quick(text=str(empty)))
    from qwenforge.distill.init_student import init_student

    one_layer = tmp_path / "one-layer"
    init_student(tiny_llama, one_layer, "1")
    with pytest.raises(QwenforgeError, match="layers"):
        heal(tiny_converted, tmp_path / "o", one_layer, _quick(method="layerwise"))
    assert not (tmp_path / "o").exists()


def test_cli_heal_linearize(tiny_llama, tiny_converted, tmp_path):
    from qwenforge.cli import app

    out = tmp_path / "healed"
    result = CliRunner().invoke(app, ["heal", str(tiny_converted), str(out), "--teacher", str(tiny_llama), "--method", "linearize", "--formats", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["after"]["top1_agreement"] == 1.0 and facts["after"]["kl"] < 1e-5 < 0.1 < facts["before"]["kl"]
    assert set(json.loads((out / "heal_report.json").read_text())["formats"]) == {"bf16"}  # --formats reaches the heal
    again = CliRunner().invoke(app, ["heal", str(tiny_converted), str(out), "--teacher", str(tiny_llama), "--method", "linearize"])
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_convert_with_heal_heals_in_place(tmp_path, tiny_llama):
    """`convert --heal linearize` leaves one folder: converted, healed, provenance of both stages."""
    from qwenforge.cli import app

    out = tmp_path / "converted-healed"
    result = CliRunner().invoke(app, ["convert", str(tiny_llama), str(out), "--no-measure", "--heal", "linearize", "--formats", "none"])
    assert result.exit_code == 0, result.output
    assert (out / "conversion_metadata.json").exists() and (out / "heal_report.json").exists()
    report = json.loads((out / "heal_report.json").read_text())
    assert report["formats"] is None  # convert's --formats reaches its heal
    assert report["after"]["top1_agreement"] > report["before"]["top1_agreement"] - 1e-9
    assert report["after"]["top1_agreement"] >= 0.99
    assert [p.name for p in tmp_path.iterdir()] == ["converted-healed"]


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama's top-16 log-probabilities on the calibration text, captured by the distillation store."""
    from qwenforge.distill.capture import capture

    out = tmp_path_factory.mktemp("heal") / "store"
    capture(tiny_llama, DATA / "calibration.txt", out, k=16, sequence_length=48, max_tokens=48 * 9)
    return out


@pytest.fixture(scope="module")
def off_norms(tmp_path_factory, qwen3_tokenizer_dir) -> tuple[Path, Path, Path]:
    """(teacher, student, store): a tiny Qwen3, the same model with its q/k norm weights scaled by 0.3-3x, the teacher's top-16."""
    import shutil

    from transformers import AutoModelForCausalLM

    from qwenforge.distill.capture import capture
    from qwenforge.fixtures.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("heal-store")
    teacher = build_tiny_checkpoint("qwen3", root / "teacher", qwen3_tokenizer_dir, initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.mul_(torch.empty(norm.weight.shape).uniform_(0.3, 3.0, generator=generator))
    model.save_pretrained(root / "student")
    for item in teacher.iterdir():
        if not (root / "student" / item.name).exists():
            shutil.copy2(item, root / "student" / item.name)
    capture(teacher, DATA / "calibration.txt", root / "store", k=16, sequence_length=48, max_tokens=48 * 9)
    return teacher, root / "student", root / "store"


def test_heal_from_a_teacher_store_lowers_heldout_kl_without_loading_the_teacher(off_norms, tmp_path, monkeypatch):
    import qwenforge.heal as heal_module

    teacher, student, store = off_norms
    loaded = []
    real_load = heal_module._load
    monkeypatch.setattr(heal_module, "_load", lambda folder, what: loaded.append(what) or real_load(folder, what))
    report = heal(student, tmp_path / "healed", teacher, _quick(train="norms", method="global", steps=12, learning_rate=0.1, eval_tokens=96), teacher_logits=store)
    assert loaded == ["converted model"]
    kls = [row["kl"] for row in report["phases"]["global"]["history"]]
    assert kls == sorted(kls, reverse=True) and report["after"]["kl"] < 0.6 * report["before"]["kl"]
    assert report["teacher_logits"]["k"] == 16 and report["heldout_text"] == str(store)
    with pytest.raises(QwenforgeError, match="hidden states"):
        heal(student, tmp_path / "o", teacher, _quick(method="layerwise+global"), teacher_logits=store)
    with pytest.raises(QwenforgeError, match="store holds the text"):
        heal(student, tmp_path / "o", teacher, _quick(method="global", text=str(DATA / "calibration.txt")), teacher_logits=store)
    with pytest.raises(QwenforgeError, match="capture more text"):
        heal(student, tmp_path / "o", teacher, _quick(method="global", eval_tokens=48 * 9), teacher_logits=store)
    assert not (tmp_path / "o").exists()


def test_a_store_of_another_tokenizer_is_refused(off_norms, tiny_llama, tiny_converted, tmp_path):
    with pytest.raises(QwenforgeError, match="another tokenizer than the teacher"):
        heal(tiny_converted, tmp_path / "o", tiny_llama, _quick(method="global"), teacher_logits=off_norms[2])
    assert not (tmp_path / "o").exists()


def test_linearize_needs_no_teacher_and_a_store_measures_it(tiny_llama, tiny_converted, teacher_store, tmp_path):
    linearized = heal(tiny_converted, tmp_path / "linearized", tiny_llama, _quick(method="linearize", eval_tokens=96), teacher_logits=teacher_store)
    assert linearized["before"]["top1_agreement"] < 1.0 == linearized["after"]["top1_agreement"]
    assert linearized["after"]["kl"] < 1e-3 < linearized["before"]["kl"]


def test_a_teacher_that_does_not_fit_is_refused_with_the_way_out(tiny_llama, tiny_converted, teacher_store, tmp_path):
    import subprocess
    import sys

    from qwenforge.checkpoint.folder import read_config
    from qwenforge.devices import GIB
    options = _quick(method="linearize", eval_tokens=96)
    vocab = max(read_config(tiny_llama)["vocab_size"], read_config(tiny_converted)["vocab_size"])
    live = engine.memory_estimate(tiny_llama, tiny_converted, vocab, options.eval_tokens, options)
    stored = engine.memory_estimate(None, tiny_converted, vocab, options.eval_tokens, options)
    assert live["teacher"] > 0 == stored["teacher"] and live["student"] == stored["student"] > 1_000_000
    between = (stored["total"] + live["total"]) / 2 / GIB  # the student fits, teacher and student do not
    result = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "heal", str(tiny_converted), str(tmp_path / "o"), "--teacher", str(tiny_llama), "--memory", str(between)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "distill capture" in result.stderr and "--teacher-logits" in result.stderr
    layerwise = subprocess.run(
        [sys.executable, "-m", "qwenforge.cli", "heal", str(tiny_converted), str(tmp_path / "o"), "--teacher", str(tiny_llama), "--teacher-logits", str(teacher_store), "--method", "layerwise"],
        capture_output=True, text=True, timeout=120,
    )
    assert layerwise.returncode == 2 and "hidden states" in layerwise.stderr
    assert not (tmp_path / "o").exists()
    report = heal(tiny_converted, tmp_path / "o", tiny_llama, HealOptions(**{**options.__dict__, "memory_gb": between}), teacher_logits=teacher_store)
    assert report["after"]["top1_agreement"] == 1.0
    with pytest.raises(QwenforgeError, match="student alone"):
        heal(tiny_converted, tmp_path / "o2", tiny_llama, HealOptions(**{**options.__dict__, "memory_gb": stored["total"] / 2 / GIB}), teacher_logits=teacher_store)


def test_teacher_and_student_without_a_shared_vocabulary_are_refused(tiny_llama, tiny_converted, tmp_path):
    """A teacher whose tokenizer names no token at the same id: refused before any weights load."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    teacher = tmp_path / "other-vocab"
    shutil.copytree(tiny_llama, teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (teacher / name).unlink(missing_ok=True)
    vocab = {f"<word{i}>": i for i in range(200)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<word0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(teacher / "tokenizer.json"))
    (teacher / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(QwenforgeError, match="share no vocabulary"):
        heal(tiny_converted, tmp_path / "o", teacher, _quick(method="global"))
    assert not (tmp_path / "o").exists()


def test_resume_restores_weights_optimizer_and_step(off_norms, tmp_path, monkeypatch):
    """A heal killed after its first checkpoint and resumed ends with the uninterrupted heal's weights."""
    from safetensors.torch import load_file

    teacher, student, store = off_norms
    options = _quick(train="norms", method="global", steps=8, eval_every=4, patience=10, learning_rate=0.1, eval_tokens=96)
    whole = heal(student, tmp_path / "whole", teacher, options, teacher_logits=store)
    assert whole["phases"]["global"]["best_step"] == 8
    real_loss, calls = engine.distillation_loss, []

    def dies_at_step_six(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(engine, "distillation_loss", dies_at_step_six)
    with pytest.raises(RuntimeError, match="killed"):
        heal(student, tmp_path / "resumed", teacher, options, teacher_logits=store)
    monkeypatch.setattr(engine, "distillation_loss", real_loss)
    work = tmp_path / ".heal-work-resumed"
    assert json.loads((work / "global" / "state.json").read_text())["step"] == 4 and (work / "global" / "optimizer.safetensors").exists()
    resumed = heal(student, tmp_path / "resumed", teacher, options, teacher_logits=store, resume=True)
    assert [row["step"] for row in resumed["phases"]["global"]["history"]] == [0, 4, 8]
    expected, got = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    norms = [name for name in expected if name.endswith(("q_norm.weight", "k_norm.weight"))]
    assert norms and not torch.equal(expected[norms[0]], load_file(str(student / "model.safetensors"))[norms[0]])
    for name in norms:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    assert resumed["after"]["kl"] == pytest.approx(whole["after"]["kl"], rel=1e-6)


@pytest.fixture(scope="module")
def sharp_qwen2(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    from qwenforge.fixtures.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("heal") / "qwen2", qwen25_tokenizer_dir, initializer_range=0.2)


@pytest.fixture(scope="module")
def sharp_qwen2_converted(tmp_path_factory, sharp_qwen2) -> Path:
    from qwenforge.convert.run import convert

    out = tmp_path_factory.mktemp("heal") / "qwen2-converted"
    convert(sharp_qwen2, out, measure=False)  # biases kept (the default), calibrated q/k-norm
    return out


def test_a_transplant_that_only_adds_tokens_is_measured_per_format(sharp_qwen2, qwen3_tokenizer_dir, tmp_path):
    """Qwen2.5 -> the Qwen3 tokenizer (4 new tokens, the same ids for every text): heal still measures each format."""
    from qwenforge.convert.run import convert

    convert(sharp_qwen2, tmp_path / "converted", measure=False, tokenizer=qwen3_tokenizer_dir)
    report = heal(tmp_path / "converted", tmp_path / "anchored", sharp_qwen2, _quick(formats=HealOptions().formats))
    assert set(report["formats"]) == {"bf16", "fp16", "q8_0"}


def test_anchor_heals_in_closed_form_with_weights_in_a_normal_range(sharp_qwen2, sharp_qwen2_converted, tmp_path):
    from safetensors.torch import load_file

    from qwenforge.convert.qk_norm import FLOAT16_SMALLEST_NORMAL, fragile_qk_reason

    report = heal(sharp_qwen2_converted, tmp_path / "anchored", sharp_qwen2, _quick(formats=HealOptions().formats))  # the default where biases were kept
    assert report["options"]["method"] == "anchor" and report["after"]["kl"] < report["before"]["kl"]
    assert set(report["formats"]) == {"bf16", "fp16", "q8_0"} and report["formats"]["bf16"]["source_top1"] > 0.9
    assert "## Healed (anchor)" in (tmp_path / "anchored" / "README.md").read_text()
    pairs = report["anchored"]["pairs_given_up"]
    # Exactly what was given up: the source with that RoPE pair's q/k rows and biases zeroed computes the anchored model
    reduced, anchored = _load(sharp_qwen2), _load(tmp_path / "anchored")
    with torch.no_grad():
        for layer, pair in zip(reduced.model.layers, pairs):
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                head_dim = layer.self_attn.head_dim
                rows = [h * head_dim + d for h in range(projection.out_features // head_dim) for d in (pair, pair + head_dim // 2)]
                projection.weight[rows] = 0
                projection.bias[rows] = 0
        ids = torch.randint(0, 151_000, (1, 48), generator=torch.Generator().manual_seed(2))
        expected = torch.log_softmax(reduced(ids).logits[..., :151_643], -1)
        produced = torch.log_softmax(anchored(ids).logits[..., :151_643], -1)
    assert (expected.exp() * (expected - produced)).sum(-1).max() < 1e-3  # KL per position
    weights, source = load_file(str(tmp_path / "anchored" / "model.safetensors")), load_file(str(sharp_qwen2 / "model.safetensors"))
    for layer, pair in enumerate(pairs):
        q_norm = weights[f"model.layers.{layer}.self_attn.q_norm.weight"]
        head_dim = q_norm.numel()
        given_up = [pair, pair + head_dim // 2]
        assert (q_norm[given_up] == 0).all() and (q_norm.abs() < 65504).all()
        original = source[f"model.layers.{layer}.self_attn.q_proj.weight"]
        q_proj = weights[f"model.layers.{layer}.self_attn.q_proj.weight"].view(-1, head_dim, original.shape[-1])
        kept = [d for d in range(head_dim) if d not in given_up]
        torch.testing.assert_close(q_proj[:, kept], original.view(-1, head_dim, original.shape[-1])[:, kept])
        assert (q_proj[:, given_up] == 0).all() and q_proj.abs().max() > FLOAT16_SMALLEST_NORMAL
    assert fragile_qk_reason(tmp_path / "anchored") is None


def test_anchor_needs_kept_biases(tiny_llama, tiny_converted, tmp_path):
    with pytest.raises(QwenforgeError, match="needs q/k biases.*without --drop-bias"):
        heal(tiny_converted, tmp_path / "o", tiny_llama, _quick(method="anchor"))


def test_a_linearized_checkpoint_is_recognised_as_fragile(tiny_llama, tiny_converted, tmp_path):
    """train, distill and float16 inference share one check; linearize stays available and labelled."""
    from qwenforge.convert.qk_norm import fragile_qk_reason
    from qwenforge.distill.train import DistillOptions, train_online
    from qwenforge.infer.load import LoadSetup, _avoid_fragile_float16
    from qwenforge.train.pipeline import refuse_fragile

    heal(tiny_converted, tmp_path / "linear", tiny_llama, _quick(method="linearize"))
    reason = fragile_qk_reason(tmp_path / "linear")
    assert reason and "below float16's smallest normal" in reason and "--method anchor" in reason
    assert fragile_qk_reason(tiny_converted) is None
    with pytest.raises(QwenforgeError, match="^train: .*underflow"):
        refuse_fragile(tmp_path / "linear", "train")
    with pytest.raises(QwenforgeError, match="^distill: .*underflow"):
        train_online(tiny_llama, tmp_path / "linear", DATA / "calibration.txt", DATA / "heldout.txt", None, DistillOptions())
    chosen = _avoid_fragile_float16(LoadSetup(device="cpu", dtype="float16", quant="none", reason="fp16 fast"), tmp_path / "linear", explicit=False)
    assert chosen.dtype == "float32" and "not float16" in chosen.reason
    with pytest.raises(QwenforgeError, match="--dtype float16: "):
        _avoid_fragile_float16(LoadSetup(device="cpu", dtype="float16", quant="none", reason=""), tmp_path / "linear", explicit=True)


def test_heal_across_vocabularies(tiny_llama, tiny_other_vocab, tmp_path):
    """`convert --tokenizer OTHER --heal` (was refused): the teacher reads the student's text through its own
    vocabulary (by token string, pieces where it lacks a token); the heal lowers KL on the shared tokens."""
    from qwenforge.cli import app
    from qwenforge.convert.run import convert

    out = tmp_path / "other-healed"
    result = CliRunner().invoke(app, ["convert", str(tiny_llama), str(out), "--tokenizer", str(tiny_other_vocab), "--no-measure", "--heal", "linearize", "--accept-lossy"])
    assert result.exit_code == 0, result.output
    linearized = json.loads((out / "heal_report.json").read_text())
    assert 0 < linearized["teacher_reads_whole_tokens"] < 1 and 0 < linearized["shared_vocabulary"] < 2000
    assert linearized["after"]["kl"] < linearized["before"]["kl"] and linearized["after"]["top1_agreement"] > linearized["before"]["top1_agreement"]
    converted = tmp_path / "other-converted"
    convert(tiny_llama, converted, tokenizer=tiny_other_vocab, measure=False)
    report = heal(converted, tmp_path / "healed", tiny_llama, _quick(train="norms", method="global", steps=12, learning_rate=0.02, heal_tokens=2000))
    assert report["after"]["kl"] < report["before"]["kl"] and report["phases"]["global"]["best_step"] > 0


@pytest.mark.parametrize(("source", "with_donor"), [("tiny_llama", False), ("tiny_llama", True), ("tiny_qwen2_tied", False)], ids=["piece-features", "donor-features", "tied-head"])
def test_heal_maps_every_new_row_after_a_transplant(request, tiny_other_vocab, tmp_path, source, with_donor):
    """--train vocabulary (a transplant to another tokenizer) learns one map of the new tokens' rows, from
    the donor's rows where the conversion projected them (else the source's rows of their pieces): every
    new row moves, those of tokens the healing text never holds included, shared rows stay as copied;
    every layer projection takes a merged low-rank update, the norms stay;
    the teacher's samples join the text; held-out bits per byte, which picks the step, falls (the tiny random
    teacher is no model of the text, so this test learns from the text alone: --ce-weight 1)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from qwenforge.convert.run import convert

    source = request.getfixturevalue(source)
    converted = tmp_path / "converted"
    convert(source, converted, tokenizer=tiny_other_vocab, donor=tiny_other_vocab if with_donor else None, qk_norm="ones", measure=False, accept_lossy=True)
    report = heal(converted, tmp_path / "healed", source, _quick(train="vocabulary", method="global", steps=12, heal_tokens=2000, sample_tokens=512, ce_weight=1.0, formats="q8_0"))
    assert report["after"]["bits_per_byte"] < report["before"]["bits_per_byte"] and report["phases"]["global"]["best_step"] > 0
    best = min(report["phases"]["global"]["history"], key=lambda row: row["bits_per_byte"])
    assert best["step"] == report["phases"]["global"]["best_step"]
    assert report["teacher_samples"]["tokens"] == 512 and report["teacher_samples"]["samples"] == 4
    assert ("donor" in report["vocabulary_map"]["features"]) == with_donor
    quantized = report["formats"]["q8_0"]  # another tokenization: bits per byte in the format, each model reading the text its own way
    assert quantized["top1"] is None and quantized["bits_per_byte_ratio"] == pytest.approx(quantized["bits_per_byte"] / quantized["source_bits_per_byte"])
    before, after = load_file(converted / "model.safetensors"), load_file(tmp_path / "healed" / "model.safetensors")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    rows = moved & {"model.embed_tokens.weight", "lm_head.weight"}
    assert "model.embed_tokens.weight" in rows
    assert moved - rows == {name for name in before if name.split(".")[-2] in PROJECTIONS and name.endswith(".weight")}
    tokenizer, teacher_vocab = AutoTokenizer.from_pretrained(converted), AutoTokenizer.from_pretrained(source).get_vocab()
    new = {i for token, i in tokenizer.get_vocab().items() if token not in teacher_vocab}
    seen = set(tokenizer(DATA.joinpath("calibration.txt").read_text())["input_ids"])
    for name in rows:
        changed = set((before[name] != after[name]).any(-1).nonzero().flatten().tolist())
        assert changed == new, (name, sorted(changed ^ new)[:10])
    assert new - seen, "the healing text holds every new token; the test shows nothing about the others"
    assert report["vocabulary_map"]["new_tokens"] == len(new)
    hidden = before["model.embed_tokens.weight"].shape[1]
    width = load_file(tiny_other_vocab / "model.safetensors")["model.embed_tokens.weight"].shape[1] if with_donor else 3 * hidden
    assert sorted(report["vocabulary_map"]["maps"]) == sorted(rows)  # a tied head is its embedding: one map
    low_rank = sum(16 * sum(before[name].shape) for name in moved - rows)
    assert report["trainable_parameters"] == len(rows) * (width + 1) * hidden + low_rank


def test_vocabulary_heal_refuses_a_student_without_new_tokens(tiny_llama, tiny_converted, tmp_path):
    """--train vocabulary on a conversion that kept its source's tokenizer: one line before any sampling or training."""
    with pytest.raises(QwenforgeError, match="no row is new.*--train norms"):
        heal(tiny_converted, tmp_path / "healed", tiny_llama, _quick(train="vocabulary", method="global"))
    assert not (tmp_path / "healed").exists()
