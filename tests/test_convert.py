"""convert: tiny Qwen2 (with biases) -> Qwen3 with the real Qwen2.5 and Qwen3 tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer as FastTokenizer

from qwenforge.checkpoint.folder import sha256_of
from qwenforge.checkpoint.safetensors_io import TensorReader
from qwenforge.convert.vocab import padding_sample
from qwenforge.convert import convert
from qwenforge.convert.tensor_map import format_tensor_map
from qwenforge.fixtures.tiny import build_tiny_checkpoint

QWEN25_TOKENS = 151_665
QWEN3_TOKENS = 151_669
NEW_QWEN3_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader(folder)
    return {name: reader.get(name) for name in reader.names()}


@pytest.fixture(scope="module")
def donor16(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A Qwen3 donor with the tiny Qwen2's head_dim (16), so --qk-norm donor applies."""
    return build_tiny_checkpoint("qwen3-untied", tmp_path_factory.mktemp("donor") / "qwen3-hd16", qwen3_tokenizer_dir, seed=3, head_dim=16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_qwen2, tiny_qwen3_untied):
    """tiny Qwen2 -> Qwen3 tokenizer, one output per new-token method (no model loads: fast)."""
    outputs = {}
    for method in ("subword", "mean", "zero"):
        out = tmp_path_factory.mktemp("converted") / method
        convert(tiny_qwen2, out, donor=tiny_qwen3_untied, qk_norm="ones", new_token_init=method, measure=False)
        outputs[method] = out
    return outputs


@pytest.mark.parametrize(
    ("kind", "keep_bias"), [("tiny_qwen2", False), ("tiny_qwen2", True), ("tiny_qwen2_tied", False), ("tiny_llama", True)]
)
def test_plan_matches_stock_qwen3_exactly(kind, keep_bias, request, tmp_path, qwen3_tokenizer_dir):
    """The dry-run plan names every tensor of stock Qwen3ForCausalLM built from the output config, with its shape."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    source = request.getfixturevalue(kind)
    result = convert(source, tmp_path / "out", tokenizer=qwen3_tokenizer_dir, keep_bias=keep_bias, qk_norm="ones", dry_run=True)
    assert not (tmp_path / "out").exists()
    config = {k: v for k, v in result["config"].items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    stock = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        stock.pop("lm_head.weight")
    planned = {step.name: step.shape for step in result["plan"]["steps"]}
    assert planned == stock
    ops = {step.name: step.op for step in result["plan"]["steps"]}
    assert ops["model.layers.1.self_attn.q_norm.weight"] == "ones"
    assert ops["model.embed_tokens.weight"] == "transplant-rows"
    dropped = {d["name"] for d in result["plan"]["dropped"]}
    has_bias = kind.startswith("tiny_qwen2")
    assert ("model.layers.0.self_attn.q_proj.bias" in dropped) == (has_bias and not keep_bias)
    assert config["attention_bias"] == (has_bias and keep_bias)
    assert "model.layers.0.self_attn.k_norm.weight" in format_tensor_map(result["plan"])


def test_sliding_window_settings_kept_and_load_cleanly(tmp_path, qwen25_tokenizer_dir):
    from transformers import Qwen3Config

    source = build_tiny_checkpoint(
        "qwen2", tmp_path / "sliding", qwen25_tokenizer_dir, use_sliding_window=True, sliding_window=64, max_window_layers=1
    )
    result = convert(source, tmp_path / "out", qk_norm="ones", dry_run=True)
    config = result["config"]
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    assert (config["use_sliding_window"], config["sliding_window"], config["max_window_layers"]) == (True, 64, 1)
    loaded = Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    assert loaded.layer_types == config["layer_types"] and loaded.sliding_window == 64
    assert loaded.rope_parameters["rope_theta"] == 1_000_000
    assert any(w["code"] == "sliding-window-on" for w in result["warnings"])


def test_shared_rows_identical_and_untied_head_kept(converted, tiny_qwen2):
    source = load_all(tiny_qwen2)
    out = load_all(converted["subword"])
    config = json.loads((converted["subword"] / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 151_936
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (151_936, 64)
        # Qwen2.5 and Qwen3 share the first 151,665 token strings at the same ids
        assert torch.equal(out[name][:QWEN25_TOKENS], source[name][:QWEN25_TOKENS])
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    for name, tensor in source.items():
        if "embed" not in name and "lm_head" not in name and "_proj.bias" not in name:
            assert torch.equal(out[name], tensor), name


def test_padding_rows_are_mean_of_real_rows(converted):
    out = load_all(converted["mean"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        matrix = out[name]
        expected = matrix[padding_sample(QWEN3_TOKENS)].float().mean(0).to(matrix.dtype)
        torch.testing.assert_close(matrix[QWEN3_TOKENS:], expected.expand(151_936 - QWEN3_TOKENS, -1))


def test_new_token_rows_by_method(converted, tiny_qwen2, qwen25_tokenizer_dir):
    source = load_all(tiny_qwen2)
    tokenizer = FastTokenizer.from_file(str(qwen25_tokenizer_dir / "tokenizer.json"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        real = source[name][:QWEN25_TOKENS]
        zero = load_all(converted["zero"])[name]
        assert torch.count_nonzero(zero[QWEN25_TOKENS:QWEN3_TOKENS]) == 0
        mean = load_all(converted["mean"])[name]
        torch.testing.assert_close(mean[QWEN25_TOKENS:QWEN3_TOKENS], real.mean(0).expand(4, -1))
        subword = load_all(converted["subword"])[name]
        for offset, token in enumerate(NEW_QWEN3_TOKENS):
            pieces = tokenizer.encode(token, add_special_tokens=False).ids
            assert len(pieces) > 1
            torch.testing.assert_close(subword[QWEN25_TOKENS + offset], source[name][pieces].mean(0))


def test_donor_projected_recovers_a_linear_donor(tmp_path, tiny_qwen2, qwen3_tokenizer_dir):
    """A donor whose rows are an exact linear image (wider: 96) of the source's: projection returns the planted vectors."""
    donor = build_tiny_checkpoint("qwen3-untied", tmp_path / "donor", qwen3_tokenizer_dir, hidden_size=96)
    source = load_all(tiny_qwen2)
    torch.manual_seed(0)
    planted = {}
    state = load_all(donor)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        mixing = torch.randn(64, 96, dtype=torch.float64)
        offset = torch.randn(96, dtype=torch.float64)
        planted[name] = torch.randn(4, 64)
        rows = torch.zeros(151_936, 96, dtype=torch.float64)
        rows[:QWEN25_TOKENS] = source[name][:QWEN25_TOKENS].double() @ mixing + offset
        rows[QWEN25_TOKENS:QWEN3_TOKENS] = planted[name].double() @ mixing + offset
        state[name] = rows.float()
    from qwenforge.checkpoint.safetensors_io import write_state_dict

    (donor / "model.safetensors").unlink()
    write_state_dict(donor, state)
    result = convert(tiny_qwen2, tmp_path / "out", donor=donor, qk_norm="ones", measure=False)
    assert result["metadata"]["options"]["new_token_init"] == "donor-projected"
    out = load_all(tmp_path / "out")
    for name, vectors in planted.items():
        torch.testing.assert_close(out[name][QWEN25_TOKENS:QWEN3_TOKENS], vectors, atol=2e-3, rtol=2e-3)
        assert result["metadata"]["projection"][name]["relative_residual"] < 1e-4
    think = [row for row in result["metadata"]["special_tokens"] if row["token"] == "<think>"][0]
    assert think["source_id"] is None and think["init"] == "donor-projected"


def _identity_qk_norm(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()


def test_kept_biases_reproduce_source_attention_exactly(tmp_path, tiny_qwen2):
    """With --keep-bias and q/k-norm taken out, the converted model computes the source's logits."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    kept = tmp_path / "kept"
    convert(tiny_qwen2, kept, keep_bias=True, qk_norm="ones", measure=False)
    dropped = tmp_path / "dropped"
    result = convert(tiny_qwen2, dropped, keep_bias=False, qk_norm="ones", measure=False)
    source = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    ids = torch.randint(0, 151_000, (1, 12), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, 12, 64)
    with torch.no_grad():
        reference = source(ids).logits
        model = Qwen3ForCausalLM.from_pretrained(kept, dtype=torch.float32)
        for kind in ("q", "k", "v"):
            theirs = getattr(source.model.layers[0].self_attn, f"{kind}_proj")(hidden)
            ours = getattr(model.model.layers[0].self_attn, f"{kind}_proj")(hidden)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        _identity_qk_norm(model)
        # padding rows (151,665 on) are reset to the mean real row; every real token's logit is the source's
        torch.testing.assert_close(model(ids).logits[..., :QWEN25_TOKENS], reference[..., :QWEN25_TOKENS])
        without = Qwen3ForCausalLM.from_pretrained(dropped, dtype=torch.float32)
        _identity_qk_norm(without)
        assert (without(ids).logits - reference).abs().max() > 1e-3
    padding = Qwen3ForCausalLM.from_pretrained(kept).lm_head.weight[QWEN25_TOKENS:]
    torch.testing.assert_close(padding, source.lm_head.weight[padding_sample(QWEN25_TOKENS)].mean(0).expand_as(padding))
    assert result["metadata"]["vocabulary"]["padding_rows"] == 152_064 - QWEN25_TOKENS
    bias = result["metadata"]["bias_dropped"]
    assert bias["count"] == 6 and bias["max_norm"] > 0
    assert any(w["code"] == "bias-dropped" for w in result["metadata"]["warnings"])


def test_donor_qk_norm_is_copied(tmp_path, tiny_qwen2, donor16):
    result = convert(tiny_qwen2, tmp_path / "out", donor=donor16, measure=False)
    assert result["metadata"]["options"]["qk_norm"] == "donor"
    donor = load_all(donor16)
    out = load_all(tmp_path / "out")
    for name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        assert torch.equal(out[name], donor[name])
    assert any(w["code"] == "donor-qk-norm" for w in result["warnings"])


def test_biases_are_kept_by_default(tmp_path, tiny_qwen2):
    result = convert(tiny_qwen2, tmp_path / "out", dry_run=True)
    assert result["config"]["attention_bias"] is True and not [d for d in result["plan"]["dropped"] if d["name"].endswith("_proj.bias")]


def test_donor_of_another_depth_maps_norms_by_relative_depth(tmp_path, tiny_qwen2, qwen3_tokenizer_dir):
    """The seed's case (Qwen2.5-72B, 80 layers; Qwen3-32B donor, 64): norms come from the same relative depth, recorded."""
    from qwenforge.convert.tensor_map import donor_layer_map

    assert donor_layer_map(80, 64)[:3] == [0, 1, 2] and donor_layer_map(80, 64)[-1] == 63 and donor_layer_map(80, 64)[40] == 32
    deep = build_tiny_checkpoint("qwen3-untied", tmp_path / "deep", qwen3_tokenizer_dir, seed=4, head_dim=16, num_hidden_layers=5)
    result = convert(tiny_qwen2, tmp_path / "out", donor=deep, measure=False)
    assert result["metadata"]["donor_layer_map"] == [0, 4]  # the tiny source has 2 layers
    assert any(w["code"] == "donor-depth-differs" for w in result["warnings"])
    donor, out = load_all(deep), load_all(tmp_path / "out")
    assert torch.equal(out["model.layers.1.self_attn.k_norm.weight"], donor["model.layers.4.self_attn.k_norm.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_norm.weight"], donor["model.layers.0.self_attn.q_norm.weight"])


def test_a_broken_conversion_stops_and_keeps_the_folder(tmp_path, tiny_qwen2, monkeypatch):
    """The gate on measured fidelity: here every conversion counts as broken (threshold above 100%)."""
    from qwenforge.convert import run
    from qwenforge.errors import QwenforgeError

    monkeypatch.setattr(run, "BROKEN_TOP1", 1.01)
    out = tmp_path / "out"
    with pytest.raises(QwenforgeError, match="converted but broken: held-out top-1 agreement .* --accept-lossy"):
        convert(tiny_qwen2, out, qk_norm="ones", fidelity_tokens=64, formats=None)
    record = json.loads((out / "conversion_metadata.json").read_text())
    assert record["broken"].startswith("held-out top-1") and "Broken" in (out / "README.md").read_text()
    accepted = convert(tiny_qwen2, out, qk_norm="ones", fidelity_tokens=64, force=True, accept_lossy=True, formats=None)
    assert accepted["metadata"]["broken"] and "--accept-lossy" in accepted["metadata"]["options"]["command"]


def test_calibrated_qk_norm_is_the_least_squares_fit(tmp_path, tiny_qwen2):
    """Independent check: per dimension, the weight minimising sum (w * normed - source projection)^2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwenforge.convert.qk_norm import calibrate

    text = "The quick brown fox jumps over the lazy dog. " * 8
    norms = calibrate(tiny_qwen2, text, keep_bias=False, max_tokens=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(tiny_qwen2)(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :64]
    captured = {}
    layer = model.model.layers[1].self_attn
    handle = layer.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o.detach()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    target = captured["k"].reshape(-1, 16)
    without_bias = (captured["k"] - layer.k_proj.bias).reshape(-1, 16)
    normed = without_bias / without_bias.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    expected = torch.stack([torch.linalg.lstsq(normed[:, d : d + 1], target[:, d : d + 1]).solution[0, 0] for d in range(16)])
    torch.testing.assert_close(norms["model.layers.1.self_attn.k_norm.weight"], expected, rtol=1e-4, atol=1e-5)


def test_tied_source_stays_tied(tmp_path, tiny_qwen2_tied, qwen3_tokenizer_dir):
    convert(tiny_qwen2_tied, tmp_path / "out", tokenizer=qwen3_tokenizer_dir, qk_norm="ones", measure=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in TensorReader(tmp_path / "out").names()


def test_output_loads_generates_and_records_provenance(tmp_path, tiny_qwen2, tiny_qwen3_untied):
    """Full conversion with calibrated q/k-norm: stock Qwen3ForCausalLM load, generation, fidelity, exact files."""
    out = tmp_path / "out"
    result = convert(
        tiny_qwen2, out, donor=tiny_qwen3_untied, qk_norm="calibrated", keep_bias=True,
        max_shard_size="30MB", fidelity_tokens=128, calibration_tokens=128,
    )
    assert result["out"] == out and result["metadata"]["options"]["qk_norm"] == "calibrated"
    files = {p.name for p in out.iterdir()}
    shards = {name for name in files if name.endswith(".safetensors")}
    assert len(shards) == 3  # two 39 MB vocabulary matrices and the rest
    assert files - shards == {
        "README.md", "config.json", "config_diff.json", "conversion_metadata.json", "generation_config.json",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    }
    record = json.loads((out / "conversion_metadata.json").read_text())
    assert record["smoke_test"]["loaded_with"] == "Qwen3ForCausalLM" and record["smoke_test"]["new_tokens"] > 0
    fidelity = record["fidelity"]
    assert fidelity["same_tokenization"] and fidelity["top1_agreement"] > 0.95 and fidelity["kl"] < 1e-3  # calibrated, biases kept: near exact
    assert len(fidelity["layer_cosine"]) == 3
    assert record["inputs"]["source"]["sha256"]["model.safetensors"] == sha256_of(tiny_qwen2 / "model.safetensors")
    assert "tokenizer.json" in record["inputs"]["donor"]["sha256"]
    assert record["options"]["keep_bias"] is True and record["qwenforge_version"]
    ops = {t["name"]: t["op"] for t in record["tensors"]}
    assert ops["model.layers.0.self_attn.o_proj.bias"] == "zeros"
    assert {row["token"] for row in record["special_tokens"]} >= {"<|im_end|>", "<think>"}
    diff = json.loads((out / "config_diff.json").read_text())
    assert diff["changed"]["model_type"] == {"from": "qwen2", "to": "qwen3"}
    assert diff["changed"]["vocab_size"] == {"from": 152_064, "to": 151_936}
    assert "head_dim" in diff["added"]
    card = (out / "README.md").read_text()
    assert "top-1 agreement" in card and f"{100 * fidelity['top1_agreement']:.1f}%" in card
    assert generation_eos(out) == 151_645
    assert not list(tmp_path.glob(".tmp-*"))


def generation_eos(folder: Path) -> int:
    return json.loads((folder / "generation_config.json").read_text())["eos_token_id"]


def test_no_padding_id_in_top_k_on_real_text(converted):
    from transformers import Qwen3ForCausalLM

    from qwenforge.files import default_text

    text = default_text("heldout.txt").read_text()
    tokenizer = FastTokenizer.from_file(str(converted["mean"] / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(text).ids[:512]])
    model = Qwen3ForCausalLM.from_pretrained(converted["mean"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids).logits[0]
    top = logits.topk(20, dim=-1).indices
    assert int(top.max()) < QWEN3_TOKENS
    # the padding logit is the mean logit over real tokens: far below the top-20 everywhere
    assert bool((logits[:, QWEN3_TOKENS] < logits.topk(20, dim=-1).values[:, -1]).all())


def test_safetensors_headers_written_streaming(converted):
    """Output shards are valid safetensors with the planned dtypes."""
    with safe_open(str(converted["zero"] / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.layers.0.self_attn.q_norm.weight").get_dtype() == "F32"


def test_streaming_conversion_never_imports_torch(tiny_qwen2, donor16, tmp_path):
    """Copy, transplant (subword rows, padding rows), donor q/k-norm and bias drop run on numpy alone:
    importing torch takes longer than copying 2 GB (checkpoint/dtypes.py)."""
    import subprocess
    import sys

    script = (
        "import sys; from qwenforge.convert import convert; "
        f"convert({str(tiny_qwen2)!r}, {str(tmp_path / 'out')!r}, donor={str(donor16)!r}, new_token_init='subword', keep_bias=False, measure=False); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert (tmp_path / "out" / "model.safetensors").exists() or (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("which", ["qwen25_tokenizer_dir", "qwen3_tokenizer_dir"])
def test_vocabulary_read_without_merges_equals_full_parse(which, request):
    from qwenforge.convert.vocab import _read_vocabulary

    raw = (request.getfixturevalue(which) / "tokenizer.json").read_bytes()
    full, fast = json.loads(raw), _read_vocabulary(raw)
    assert "merges" not in fast["model"]  # the fast path was taken
    assert fast["model"]["vocab"] == full["model"]["vocab"] and fast["added_tokens"] == full["added_tokens"]


def test_vocabulary_read_falls_back_when_merges_are_not_last():
    from qwenforge.convert.vocab import _read_vocabulary

    raw = b'{"added_tokens": [], "model": {"merges": ["a b"], "vocab": {"a": 0, "b": 1}}}'
    assert _read_vocabulary(raw) == json.loads(raw)


def test_known_hashes_are_reused_until_the_file_changes(tiny_qwen2, tmp_path, monkeypatch):
    """A second conversion takes an unchanged file's sha256 from the cache; a changed file is hashed again."""
    import os

    monkeypatch.setenv("QWENFORGE_CACHE", str(tmp_path / "cache"))
    weights = next(tiny_qwen2.glob("*.safetensors"))
    true_digest = sha256_of(weights)

    def recorded(out) -> str:
        convert(tiny_qwen2, tmp_path / out, qk_norm="ones", measure=False)
        return json.loads((tmp_path / out / "conversion_metadata.json").read_text())["inputs"]["source"]["sha256"][weights.name]

    assert recorded("first") == true_digest
    known_file = tmp_path / "cache" / "sha256.json"
    known = json.loads(known_file.read_text())
    known[str(weights.resolve())]["sha256"] = "0" * 64  # what only the cache can say
    known_file.write_text(json.dumps(known))
    assert recorded("second") == "0" * 64
    os.utime(weights)  # same bytes, new times: hashed again
    assert recorded("third") == true_digest


def test_subword_pieces_spell_the_new_tokens_bytes(tiny_other_vocab, qwen25_tokenizer_dir):
    """Between byte-level vocabularies a new token's pieces are the source's split of the bytes it stands for:
    `Ġraise` is b" raise", not the two bytes of the character Ġ followed by `raise` (how the text encoder
    read the vocabulary string). Every piece sequence spells its token exactly, and no piece is a
    fragment of Ġ's own UTF-8 encoding."""
    from qwenforge.convert import vocab

    source, target = vocab.load_tokenizer(tiny_other_vocab), vocab.load_tokenizer(qwen25_tokenizer_dir)
    assert source.byte_level and target.byte_level
    vocab_map = vocab.align(source, target, len(source), 151_936)
    tokens = [vocab_map.new_tokens[t] for t in vocab_map.new if vocab_map.new_tokens[t]]
    pieces = vocab.subword_pieces(source, tokens, target)
    spaced = 0
    for token, ids in zip(tokens, pieces):
        assert ids, token
        assert b"".join(vocab.token_bytes(source, source.by_id[i]) for i in ids) == vocab.token_bytes(target, token), token
        spaced += token.startswith("Ġ")
    assert spaced > 50_000 and vocab.token_bytes(target, "Ġraise") == b" raise" and vocab.token_bytes(target, "<|im_start|>") == b"<|im_start|>"


def test_new_token_offset_gives_new_tokens_their_share():
    """The fitted offset moves the new tokens' share of probability at the calibration hidden states to the
    target rate, along a direction the hidden states hold nearly constant."""
    import numpy as np

    from qwenforge.convert import vocab

    rng = np.random.default_rng(0)
    hidden = np.concatenate([rng.normal(size=(300, 15)), np.full((300, 1), 4.0)], axis=1).astype(np.float32)
    shared, new = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(2000, 16)).astype(np.float32)
    fit = vocab.new_token_offset(hidden, shared, new, new_rate=0.1)
    assert fit["new_share_before"] > 0.8 and fit["offset"] < 0 and fit["direction_spread"] < 1e-3
    logits = hidden @ np.concatenate([shared, new + fit["offset"] * fit["direction"]]).T
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert abs(probabilities[:, 200:].sum(1).mean() - 0.1) < 1e-3


def test_default_transplant_is_subword_with_a_calibrated_head_offset(tmp_path, tiny_other_vocab, qwen25_tokenizer_dir):
    """Without a donor the new tokens get subword rows, and the head's new rows one fitted shift (recorded)."""
    plain, calibrated = tmp_path / "subword", tmp_path / "calibrated"
    convert(tiny_other_vocab, plain, tokenizer=qwen25_tokenizer_dir, qk_norm="ones", new_token_init="subword", measure=False, accept_lossy=True)
    result = convert(tiny_other_vocab, calibrated, tokenizer=qwen25_tokenizer_dir, qk_norm="ones", measure=False, accept_lossy=True)
    record = result["metadata"]
    assert record["options"]["new_token_init"] == "subword-calibrated" and record["new_token_offset"]["offset"] < 0
    a, b = load_all(plain), load_all(calibrated)
    head = "lm_head.weight" if "lm_head.weight" in a else "model.embed_tokens.weight"
    shared = [i for i in range(QWEN25_TOKENS) if torch.equal(a[head][i], b[head][i])]
    assert 100 < len(shared) < 2000  # the tokens both vocabularies hold keep their rows
    shift = (b[head] - a[head]).float()[:QWEN25_TOKENS]
    moved = shift[shift.abs().amax(1) > 0]  # new tokens: one and the same shift (up to the stored dtype's rounding)
    assert len(moved) > 100_000 and torch.allclose(moved, moved.median(0).values.expand_as(moved), atol=1e-2 * float(moved.abs().max()))
