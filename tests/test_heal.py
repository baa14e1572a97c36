"""heal: divergences, closed-form linearization, layer-wise + global healing, refusals, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwenforge.distill import engine
from qwenforge.errors import QwenforgeError
from qwenforge.heal import HealOptions, heal, linearize_qk_norms, merge_low_rank, trainable_parameters

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
    base = dict(steps=8, eval_every=4, sequence_length=48, batch_size=2, heal_tokens=200, eval_tokens=100, threads=1)
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
    assert {"config.json", "model.safetensors", "heal_report.json", "heal_kl.png", "conversion_metadata.json", "tokenizer.json"} <= written
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
    assert report["after"]["kl"] <= report["before"]["kl"]
    assert report["phases"]["global"]["steps"] >= 4
    # a finished phase left in the work folder is picked up by --resume instead of retrained
    work = tmp_path / ".heal-work-again"
    work.mkdir()
    history = report["phases"]["global"]["history"]
    (work / "global.json").write_text(json.dumps({"step": 8, "seconds": 1.0, "history": history, "done": True}))
    from safetensors.torch import save_file

    healed = _load(out)
    trainable_parameters(healed, "attention")
    save_file({n: p.detach().contiguous() for n, p in healed.named_parameters() if p.requires_grad}, str(work / "global.safetensors"))
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
    from qwenforge.distill.init_student import init_student

    one_layer = tmp_path / "one-layer"
    init_student(tiny_llama, one_layer, "1")
    with pytest.raises(QwenforgeError, match="layers"):
        heal(tiny_converted, tmp_path / "o", one_layer, _quick(method="layerwise"))
    assert not (tmp_path / "o").exists()


def test_cli_heal_linearize(tiny_llama, tiny_converted, tmp_path):
    from qwenforge.cli import app

    out = tmp_path / "healed"
    result = CliRunner().invoke(app, ["heal", str(tiny_converted), str(out), "--teacher", str(tiny_llama), "--method", "linearize", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["after"]["top1_agreement"] == 1.0 and facts["after"]["kl"] < 1e-5 < 0.1 < facts["before"]["kl"]
    again = CliRunner().invoke(app, ["heal", str(tiny_converted), str(out), "--teacher", str(tiny_llama), "--method", "linearize"])
    assert again.exit_code != 0 and "already exists" in str(again.exception)


@pytest.mark.slow
def test_real_smollm2_linearized_matches_its_source(embedded_model_dir, tmp_path):
    """The embedded SmolLM2 converted with calibrated norms, healed in closed form, on held-out text."""
    from qwenforge.convert.run import convert

    convert(embedded_model_dir, tmp_path / "converted", measure=False)
    report = heal(tmp_path / "converted", tmp_path / "healed", embedded_model_dir, HealOptions(method="linearize", eval_tokens=512, threads=2))
    assert report["before"]["top1_agreement"] < 0.8
    assert report["after"]["top1_agreement"] >= 0.99
    assert report["after"]["bits_per_byte"] == pytest.approx(report["after"]["teacher_bits_per_byte"], rel=1e-3)


def test_convert_with_heal_heals_in_place(tmp_path, tiny_llama):
    """`convert --heal linearize` leaves one folder: converted, healed, provenance of both stages."""
    from qwenforge.cli import app

    out = tmp_path / "converted-healed"
    result = CliRunner().invoke(app, ["convert", str(tiny_llama), str(out), "--no-measure", "--heal", "linearize"])
    assert result.exit_code == 0, result.output
    assert (out / "conversion_metadata.json").exists() and (out / "heal_report.json").exists()
    report = json.loads((out / "heal_report.json").read_text())
    assert report["after"]["top1_agreement"] > report["before"]["top1_agreement"] - 1e-9
    assert report["after"]["top1_agreement"] >= 0.99
    assert [p.name for p in tmp_path.iterdir()] == ["converted-healed"]
