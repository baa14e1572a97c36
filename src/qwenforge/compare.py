"""`qwenforge compare A B --text FILE`: what a change to a model cost, measured on text.

Bits per byte (tokenizer-independent, so it holds across a vocabulary transplant) for both;
where both tokenize the text identically, also mean KL(A||B), top-1 agreement and perplexity,
and per-layer hidden-state cosine where the shapes match. Other stages (heal) call
`fidelity(reference, candidate, text)` with folders or already-loaded (model, tokenizer) pairs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qwenforge.errors import QwenforgeError

Loaded = tuple  # (model, tokenizer)


def load(model: str | Path | Loaded) -> Loaded:
    """(model, tokenizer) from a checkpoint folder on the CPU (float32, or offloaded when too big); a loaded pair passes through."""
    if isinstance(model, tuple):
        return model
    from transformers import AutoTokenizer

    from qwenforge.checkpoint.offload import load_causal_lm

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise QwenforgeError(f"{folder}: not a checkpoint folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return load_causal_lm(folder), tokenizer  # layer-offloaded when it does not fit beside another model


def text_prefix(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` covered by its first `max_tokens` tokens: both models read the same bytes."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


def _windows(ids: torch.Tensor, window: int):
    """Segments overlapping by one token, so every token after the first is predicted exactly once."""
    for start in range(0, len(ids) - 1, window):
        yield ids[start : start + window + 1]


def _shared_ids(tokenizer_a, tokenizer_b, rows_a: int, rows_b: int) -> torch.Tensor:
    """Ids that name the same token string in both tokenizers (padding rows excluded)."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    shared = sorted(i for token, i in vocab_a.items() if vocab_b.get(token) == i and i < rows_a and i < rows_b)
    return torch.tensor(shared, dtype=torch.long)


@torch.no_grad()
def bits_per_byte(model: str | Path | Loaded, text: str, window: int = 256) -> dict:
    """Bits per byte and perplexity of one model on `text`."""
    model, tokenizer = load(model)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    nll, count = 0.0, 0
    for segment in _windows(ids, window):
        logits = model(segment[:-1].unsqueeze(0)).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits, segment[1:], reduction="sum").item()
        count += len(segment) - 1
    predicted_bytes = len(text.encode()) - len(tokenizer.decode(ids[:1]).encode())
    return {
        "tokens": len(ids),
        "bits_per_byte": nll / math.log(2) / max(predicted_bytes, 1),
        "perplexity": math.exp(nll / max(count, 1)),
    }


@torch.no_grad()
def fidelity(
    reference: str | Path | Loaded,
    candidate: str | Path | Loaded,
    text: str,
    max_tokens: int = 1024,
    window: int = 256,
) -> dict:
    """Compare `candidate` with `reference` on `text` (first `max_tokens` tokens of the reference's tokenization)."""
    ref_model, ref_tok = load(reference)
    cand_model, cand_tok = load(candidate)
    text = text_prefix(ref_tok, text, max_tokens)
    ref_ids = torch.tensor(ref_tok(text, add_special_tokens=False).input_ids)
    cand_ids = torch.tensor(cand_tok(text, add_special_tokens=False).input_ids)
    if len(ref_ids) < 2:
        raise QwenforgeError("compare: the text is too short; give at least a sentence")
    same = len(ref_ids) == len(cand_ids) and bool(torch.equal(ref_ids, cand_ids))
    result = {
        "text_bytes": len(text.encode()),
        "tokens": {"reference": len(ref_ids), "candidate": len(cand_ids)},
        "same_tokenization": same,
    }
    if not same:
        result["reference"] = bits_per_byte((ref_model, ref_tok), text, window)
        result["candidate"] = bits_per_byte((cand_model, cand_tok), text, window)
        result["bits_per_byte_ratio"] = result["candidate"]["bits_per_byte"] / result["reference"]["bits_per_byte"]
        return result

    ref_rows = ref_model.get_output_embeddings().weight.shape[0]
    cand_rows = cand_model.get_output_embeddings().weight.shape[0]
    shared = _shared_ids(ref_tok, cand_tok, ref_rows, cand_rows)
    compare_layers = (
        ref_model.config.hidden_size == cand_model.config.hidden_size
        and ref_model.config.num_hidden_layers == cand_model.config.num_hidden_layers
    )
    totals = {"ref_nll": 0.0, "cand_nll": 0.0, "kl": 0.0, "agree": 0, "count": 0}
    cosine_sums = None
    for segment in _windows(ref_ids, window):
        inputs, targets = segment[:-1].unsqueeze(0), segment[1:]
        ref_out = ref_model(inputs, output_hidden_states=compare_layers)
        cand_out = cand_model(inputs, output_hidden_states=compare_layers)
        ref_logits, cand_logits = ref_out.logits[0].float(), cand_out.logits[0].float()
        totals["ref_nll"] += torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum").item()
        totals["cand_nll"] += torch.nn.functional.cross_entropy(cand_logits, targets, reduction="sum").item()
        ref_log = torch.log_softmax(ref_logits[:, shared], -1)
        cand_log = torch.log_softmax(cand_logits[:, shared], -1)
        # per-token KL is >= 0; clamping removes float32 rounding noise of identical distributions
        totals["kl"] += (ref_log.exp() * (ref_log - cand_log)).sum(-1).clamp_min(0).sum().item()
        totals["agree"] += (ref_log.argmax(-1) == cand_log.argmax(-1)).sum().item()
        totals["count"] += len(targets)
        if compare_layers:
            cosines = [
                torch.nn.functional.cosine_similarity(a[0].float(), b[0].float(), dim=-1).sum().item()
                for a, b in zip(ref_out.hidden_states, cand_out.hidden_states)
            ]
            cosine_sums = cosines if cosine_sums is None else [x + y for x, y in zip(cosine_sums, cosines)]
    count = totals["count"]
    predicted_bytes = len(text.encode()) - len(ref_tok.decode(ref_ids[:1]).encode())
    for name, key in (("reference", "ref_nll"), ("candidate", "cand_nll")):
        result[name] = {
            "tokens": len(ref_ids),
            "bits_per_byte": totals[key] / math.log(2) / max(predicted_bytes, 1),
            "perplexity": math.exp(totals[key] / count),
        }
    result["bits_per_byte_ratio"] = result["candidate"]["bits_per_byte"] / result["reference"]["bits_per_byte"]
    result["kl"] = totals["kl"] / count
    result["top1_agreement"] = totals["agree"] / count
    if cosine_sums is not None:
        result["layer_cosine"] = [value / count for value in cosine_sums]  # index 0: embeddings
    return result


def summary_line(result: dict) -> str:
    """One human line of the headline figures."""
    ref, cand = result["reference"], result["candidate"]
    line = f"bits/byte {ref['bits_per_byte']:.3f} -> {cand['bits_per_byte']:.3f}"
    if result["same_tokenization"]:
        line += (
            f"; perplexity {ref['perplexity']:.2f} -> {cand['perplexity']:.2f}; "
            f"KL {result['kl']:.4f}; top-1 agreement {100 * result['top1_agreement']:.1f}%"
        )
    return line


def plot_layers(result: dict, path: Path, title: str = "hidden-state cosine per layer") -> Path:
    """A per-layer picture of the hidden-state cosine (PNG)."""
    if "layer_cosine" not in result:
        raise QwenforgeError("--plot needs models of equal widths and depths with identical tokenization")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    values = result["layer_cosine"]
    axis.plot(range(len(values)), values, marker="o")
    axis.set_xlabel("layer (0 = embeddings)")
    axis.set_ylabel("mean cosine (B vs A)")
    axis.set_ylim(min(0.0, min(values)), 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def compare_files(a: Path, b: Path, text_file: Path, max_tokens: int = 1024, plot: Path | None = None) -> dict:
    """The `compare` verb: read the text file, measure, optionally plot."""
    text_file = Path(text_file)
    if not text_file.exists():
        raise QwenforgeError(f"{text_file}: text file not found")
    result = fidelity(a, b, text_file.read_text(), max_tokens=max_tokens)
    result["text"] = str(text_file)
    if plot:
        plot_layers(result, plot)
        result["plot"] = str(plot)
    return result
