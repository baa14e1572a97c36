"""`qwenforge compare A B --text FILE`: what a change to a model cost, measured on text.

Bits per byte (tokenizer-independent, so it holds across a vocabulary transplant) for both;
where both tokenize the text identically, also mean KL(A||B), top-1 agreement and perplexity
(--formats: per format too; across a transplant, bits per byte per format),
and per-layer hidden-state cosine where the shapes match. Other stages (heal) call
`fidelity(reference, candidate, text)` with folders or already-loaded (model, tokenizer) pairs.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

import torch

from qwenforge.fidelity import Fidelity, shared_ids, token_sequences
from qwenforge.errors import QwenforgeError

class Loaded(NamedTuple):
    """A model and its tokenizer, loaded once and handed to several measurements (a plain pair works too)."""

    model: object
    tokenizer: object


def check_folder(folder: str | Path) -> Path:
    """A checkpoint folder whose config and weight headers read cleanly: one line, not a loader's traceback."""
    from qwenforge.checkpoint.folder import read_config
    from qwenforge.checkpoint.safetensors_io import list_tensors

    folder = Path(folder)
    read_config(folder)
    list_tensors(folder)
    return folder


def load(model: str | Path | Loaded, max_memory: str | int | None = None) -> Loaded:
    """(model, tokenizer) from a checkpoint folder on the CPU (float32, or offloaded beyond `max_memory`); a loaded pair passes through."""
    if isinstance(model, tuple):
        return model
    from transformers import AutoTokenizer

    from qwenforge.checkpoint.offload import load_causal_lm

    folder = check_folder(model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return Loaded(load_causal_lm(folder, max_memory), tokenizer)  # layer-offloaded when it does not fit beside another model


def text_prefix(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` covered by its first `max_tokens` tokens: both models read the same bytes."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens])


WINDOWS_PER_PASS = 4  # the default 1,024 tokens in one forward pass: an offloaded model reads its weights once


def _batches(ids: torch.Tensor, window: int):
    """(inputs [B, T], targets [B, T], lengths) of windows overlapping by one token, so every token after
    the first is predicted exactly once; up to WINDOWS_PER_PASS windows per batch, the last
    right-padded (a causal model's real positions never see the padding)."""
    segments = [ids[start : start + window + 1] for start in range(0, len(ids) - 1, window)]
    for first in range(0, len(segments), WINDOWS_PER_PASS):
        group = segments[first : first + WINDOWS_PER_PASS]
        lengths = [len(segment) - 1 for segment in group]
        inputs = torch.zeros(len(group), max(lengths), dtype=torch.long)
        targets = torch.zeros_like(inputs)
        for row, segment in enumerate(group):
            inputs[row, : lengths[row]], targets[row, : lengths[row]] = segment[:-1], segment[1:]
        yield inputs, targets, lengths


def _forward(model, inputs: torch.Tensor, lengths: list[int], hidden: bool = False):
    mask = (torch.arange(inputs.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return model(inputs, attention_mask=mask, output_hidden_states=hidden)


@torch.no_grad()
def bits_per_byte(model: str | Path | Loaded, text: str, window: int = 256) -> dict:
    """Bits per byte and perplexity of one model on `text`."""
    model, tokenizer = load(model)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    nll, count = 0.0, 0
    for inputs, targets, lengths in _batches(ids, window):
        logits = _forward(model, inputs, lengths).logits
        for row, length in enumerate(lengths):
            nll += torch.nn.functional.cross_entropy(logits[row, :length].float(), targets[row, :length], reduction="sum").item()
            count += length
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
    for model in (reference, candidate):  # both checked before either is loaded
        if not isinstance(model, tuple):
            check_folder(model)
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
    shared = shared_ids(ref_tok, cand_tok, ref_rows, cand_rows)
    compare_layers = (
        ref_model.config.hidden_size == cand_model.config.hidden_size
        and ref_model.config.num_hidden_layers == cand_model.config.num_hidden_layers
    )
    figures = Fidelity()  # the one implementation of KL, agreement, bits per byte (heal and distill use it too)
    cosine_sums = None
    for inputs, targets, lengths in _batches(ref_ids, window):
        ref_out = _forward(ref_model, inputs, lengths, compare_layers)
        cand_out = _forward(cand_model, inputs, lengths, compare_layers)
        for row, length in enumerate(lengths):
            figures.add(cand_out.logits[row, :length], torch.log_softmax(ref_out.logits[row, :length].float(), -1), targets[row, :length], 0, shared)
            if compare_layers:
                cosines = [
                    torch.nn.functional.cosine_similarity(a[row, :length].float(), b[row, :length].float(), dim=-1).sum().item()
                    for a, b in zip(ref_out.hidden_states, cand_out.hidden_states)
                ]
                cosine_sums = cosines if cosine_sums is None else [x + y for x, y in zip(cosine_sums, cosines)]
    figures.text_bytes = len(text.encode()) - len(ref_tok.decode(ref_ids[:1]).encode())  # the bytes predicted
    summary = figures.summary()
    count = summary["positions"]
    result["reference"] = {"tokens": len(ref_ids), "bits_per_byte": summary["teacher_bits_per_byte"], "perplexity": summary["teacher_perplexity"]}
    result["candidate"] = {"tokens": len(ref_ids), "bits_per_byte": summary["bits_per_byte"], "perplexity": summary["perplexity"]}
    result["bits_per_byte_ratio"] = result["candidate"]["bits_per_byte"] / result["reference"]["bits_per_byte"]
    result["kl"] = max(summary["kl"], 0.0)  # KL >= 0; identical models can sum to float32 rounding noise below 0
    result["top1_agreement"] = summary["top1_agreement"]
    if cosine_sums is not None:
        result["layer_cosine"] = [value / count for value in cosine_sums]  # index 0: embeddings
    return result


@torch.no_grad()
def format_fidelity(
    reference: str | Path | Loaded, candidate: str | Path | Loaded, text: str, formats: list[str], max_tokens: int = 1024, window: int = 256, cache: dict | None = None
) -> dict:
    """Per format (formats.py): the source and the candidate both put in it, each scored against the float32 source.

    {format: {"source_top1", "top1", "kl", "bits_per_byte_ratio" (candidate in it / source in it)}}. A
    candidate of another tokenization (a vocabulary transplant) has no position-wise top-1 or KL, so
    each model reads the text its own way and only bits per byte is compared (top-1 and KL are None).
    `cache` (a dict kept by the caller) keeps the source's figures when one source meets many candidates.
    """
    from qwenforge.formats import formatted

    ref_model, ref_tok = load(reference)
    cand_model, cand_tok = load(candidate)
    text = text_prefix(ref_tok, text, max_tokens)
    ids = torch.tensor(ref_tok(text, add_special_tokens=False).input_ids)
    cache = {} if cache is None else cache
    if not torch.equal(ids, torch.tensor(cand_tok(text, add_special_tokens=False).input_ids)):
        results = {}
        for name in formats:
            figures = {}
            for role, pair in (("source", (ref_model, ref_tok)), ("candidate", (cand_model, cand_tok))):
                if role == "source" and (name, text, "own") in cache:
                    figures[role] = cache[(name, text, "own")]
                    continue
                with formatted(pair[0], name):
                    figures[role] = bits_per_byte(pair, text, window)["bits_per_byte"]
                if role == "source":
                    cache[(name, text, "own")] = figures[role]
            results[name] = {"source_top1": None, "top1": None, "kl": None, "source_bits_per_byte": figures["source"], "bits_per_byte": figures["candidate"],
                             "bits_per_byte_ratio": figures["candidate"] / figures["source"]}
        return results
    shared = shared_ids(ref_tok, cand_tok, ref_model.get_output_embeddings().weight.shape[0], cand_model.get_output_embeddings().weight.shape[0])
    batches = list(_batches(ids, window))
    reference_logprobs = None
    predicted_bytes = len(text.encode()) - len(ref_tok.decode(ids[:1]).encode())
    results = {}
    for name in formats:
        figures = {}
        for role, model in (("source", ref_model), ("candidate", cand_model)):
            if role == "source" and (name, text) in cache:
                figures[role] = cache[(name, text)]
                continue
            if reference_logprobs is None:
                reference_logprobs = [torch.log_softmax(_forward(ref_model, inputs, lengths).logits.float(), -1) for inputs, _, lengths in batches]
            fidelity = Fidelity()
            with formatted(model, name):
                for (inputs, targets, lengths), teacher in zip(batches, reference_logprobs):
                    logits = _forward(model, inputs, lengths).logits
                    for row, length in enumerate(lengths):
                        fidelity.add(logits[row, :length], teacher[row, :length], targets[row, :length], 0, shared)
            fidelity.text_bytes = predicted_bytes
            figures[role] = fidelity.summary()
            if role == "source":
                cache[(name, text)] = figures[role]
        source, cand = figures["source"], figures["candidate"]
        results[name] = {
            "source_top1": source["top1_agreement"], "top1": cand["top1_agreement"], "kl": max(cand["kl"], 0.0),
            "source_bits_per_byte": source["bits_per_byte"], "bits_per_byte": cand["bits_per_byte"],
            "bits_per_byte_ratio": cand["bits_per_byte"] / source["bits_per_byte"],
        }
    return results


LORA_ARM = {"steps": 50, "rank": 8, "learning_rate": 2e-4, "sequence_length": 128, "seed": 0}


def lora_trainability(reference: str | Path | Loaded, candidate: str | Path | Loaded, train_text: str, heldout_text: str, **arm) -> dict:
    """Held-out bits per byte of source and candidate before and after the same short standard PEFT
    LoRA fine-tune (q/k/v/o, same seed, data and rate): a converted model must stay trainable."""
    from peft import LoraConfig, get_peft_model

    from qwenforge.arch.spec import ATTENTION_PROJECTIONS

    settings = LORA_ARM | arm
    figures = {}
    for role, pair in (("source", reference), ("candidate", candidate)):
        model, tokenizer = load(pair)
        model = copy.deepcopy(model)  # the caller's model stays untouched
        sequences = token_sequences(tokenizer, train_text, settings["sequence_length"], what="training text")
        before = bits_per_byte((model, tokenizer), heldout_text)["bits_per_byte"]
        torch.manual_seed(settings["seed"])
        config = LoraConfig(r=settings["rank"], lora_alpha=2 * settings["rank"], target_modules=list(ATTENTION_PROJECTIONS), lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings["learning_rate"])
        peft_model.train()
        for step in range(settings["steps"]):
            ids = sequences[step % len(sequences)][None]
            loss = peft_model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        peft_model.eval()
        figures[role] = (before, bits_per_byte((peft_model, tokenizer), heldout_text)["bits_per_byte"])
        del peft_model, model
    return {
        **{k: settings[k] for k in ("steps", "rank", "learning_rate")},
        "source_before": figures["source"][0], "source_after": figures["source"][1],
        "candidate_before": figures["candidate"][0], "candidate_after": figures["candidate"][1],
        "ratio_after": figures["candidate"][1] / figures["source"][1],
    }


def top1_cells(row: dict) -> tuple[str, str]:
    """A format row's (source top-1, candidate top-1) as shown; "-" across a transplant, which has no top-1."""
    return ("-", "-") if row["top1"] is None else (f"{100 * row['source_top1']:.1f}%", f"{100 * row['top1']:.1f}%")


def formats_table(formats: dict) -> str:
    """Human lines for `format_fidelity` (and the LoRA arm when present)."""
    lines = [f"{'format':<7} {'source top-1':>12} {'top-1':>7} {'bits/byte ratio':>16}"]
    for name, row in formats.items():
        if name != "lora":
            top1 = top1_cells(row)
            lines.append(f"{name:<7} {top1[0]:>12} {top1[1]:>7} {row['bits_per_byte_ratio']:>15.4f}x")
    if "lora" in formats:
        lora = formats["lora"]
        lines.append(f"LoRA {lora['steps']} steps: held-out bits/byte source {lora['source_before']:.4f} -> {lora['source_after']:.4f}, "
                     f"candidate {lora['candidate_before']:.4f} -> {lora['candidate_after']:.4f} (ratio after x{lora['ratio_after']:.4f})")
    return "\n".join(lines)


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
    try:
        figure.savefig(path, dpi=120)
    except OSError as error:
        raise QwenforgeError(f"{path}: cannot write the plot ({error.strerror or error}); choose another path") from None
    finally:
        plt.close(figure)
    return Path(path)


def compare_files(
    a: Path, b: Path, text_file: Path, max_tokens: int = 1024, plot: Path | None = None, formats: str | None = None, train_text: Path | None = None, max_memory: str | int | None = None
) -> dict:
    """The `compare` verb: read the text file, measure (per format when `formats` names some, e.g.
    "bf16,fp16,q8_0,lora"; lora fine-tunes on `train_text`, default the packaged calibration text), optionally plot."""
    from qwenforge.files import check_writable, read_text
    from qwenforge.formats import parse_formats

    from qwenforge.checkpoint.safetensors_io import parse_memory

    text_file = Path(text_file)
    parse_memory(max_memory)  # a clear error now, not after loading
    if max_tokens < 2:
        raise QwenforgeError(f"--max-tokens {max_tokens}: must be at least 2 (one token predicts the next)")
    text = read_text(text_file, "text file")
    if plot:
        check_writable(plot, "plot")  # before the measurement, not after it
    names, lora = parse_formats(formats) if formats else ([], False)
    train = read_text(Path(train_text), "training text") if lora and train_text else None
    for model in (a, b):  # both checked before either is loaded
        check_folder(model)
    pair_a, pair_b = load(a, max_memory), load(b, max_memory)
    result = fidelity(pair_a, pair_b, text, max_tokens=max_tokens)
    result["text"] = str(text_file)
    if names:
        result["formats"] = format_fidelity(pair_a, pair_b, text, names, max_tokens=max_tokens)
    if lora:
        from qwenforge.files import default_text

        train = train if train is not None else default_text("calibration.txt").read_text()
        heldout = text_prefix(pair_a[1], text, max_tokens)
        result.setdefault("formats", {})["lora"] = lora_trainability(pair_a, pair_b, train, heldout)
    if plot:
        plot_layers(result, plot)
        result["plot"] = str(plot)
    return result
