"""`qwenforge convert SOURCE OUT`: a Qwen2/Qwen2.5 (or Llama-shaped) checkpoint rebuilt as Qwen3.

    qwenforge convert Qwen2.5-7B-Instruct/ out/ --donor Qwen3-8B/ --keep-bias

Read top to bottom: pre-flight (configs, tokenizers, options), tensor map (every output tensor from
headers alone), prepare (q/k-norm calibration, donor projection of new-token rows), stream
(tensor by tensor into the ShardedWriter inside a temporary folder), check (stock
transformers load + generation, fidelity against the source), provenance, rename.
"""

from __future__ import annotations

import errno
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenforge.arch.spec import spec_from_config
from qwenforge.checkpoint.dtypes import from_float32, to_float32, torch_dtype
from qwenforge.checkpoint.folder import atomic_output, copy_tokenizer_files, read_config, refuse_overlap, write_json
from qwenforge.checkpoint.mapped_reader import MappedReader
from qwenforge.checkpoint.safetensors_io import ShardedWriter
from qwenforge.convert import preflight, provenance, vocab
from qwenforge.convert.pickle_source import open_source
from qwenforge.convert.tensor_map import build_tensor_map, donor_layer_map
from qwenforge.convert.qk_norm import QK_NORM_METHODS
from qwenforge.convert.target_config import config_diff, qwen3_config
from qwenforge.errors import QwenforgeError
from qwenforge.files import default_text, read_text

SMOKE_PROMPT = "What is the capital of France?"
# Below these a conversion is broken, not lossy (dropped Qwen2.5 biases: top-1 0%, bits/byte x15).
BROKEN_TOP1 = 0.5
BROKEN_BITS_PER_BYTE_RATIO = 1.5


def padded_rows(count: int, multiple: int = 128) -> int:
    return -(-count // multiple) * multiple


def _remap_ids(values: dict, source_tok: vocab.Tokenizer, target_tok: vocab.Tokenizer) -> dict:
    """bos/eos/pad ids moved to the target tokenizer by token string (unknown strings drop)."""
    by_id = source_tok.by_id

    def move(value):
        if isinstance(value, list):
            moved = [move(v) for v in value]
            return [v for v in moved if v is not None]
        token = by_id.get(value) if value is not None else None
        return target_tok.vocab.get(token) if token is not None else None

    return {key: move(value) for key, value in values.items() if key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _bias_record(reader, tensor_map: dict) -> dict | None:
    """Sizes of the dropped attention biases (small tensors, read now)."""
    names = [d["name"] for d in tensor_map["dropped"] if d["name"].endswith("_proj.bias")]
    if not names:
        return None
    norms = {name: float(np.linalg.norm(to_float32(reader.array(name), reader.tensors[name].dtype))) for name in names}
    return {"count": len(names), "max_norm": max(norms.values()), "norms": norms}


def _donor_projections(
    method: str, reader, donor_reader, source_tok, donor_tok, target_tok, vocab_map, names: list[str], donor_tied: bool
) -> tuple[dict[str, np.ndarray], dict]:
    """New-token rows by least-squares projection of the donor's rows into the source space, per matrix."""
    if method != "donor-projected" or not vocab_map.new:
        return {}, {}
    target_by_id = target_tok.by_id
    out, fits = {}, {}
    for name in names:
        donor_name = "model.embed_tokens.weight" if donor_tied else name
        source_width = reader.tensors[name].shape[1]
        donor_width = donor_reader.tensors[donor_name].shape[1]
        fit_ids = [t for t in vocab.projection_sample(vocab_map, max(source_width, donor_width)) if target_by_id[t] in donor_tok.vocab]
        source_rows = vocab.read_rows(reader, name, [vocab_map.shared[t] for t in fit_ids])
        donor_rows = vocab.read_rows(donor_reader, donor_name, [donor_tok.vocab[target_by_id[t]] for t in fit_ids])
        mapping = vocab.fit_projection(donor_rows, source_rows)
        residual = np.linalg.norm(vocab.apply_projection(mapping, donor_rows) - source_rows) / np.linalg.norm(source_rows)
        in_donor = [t for t in vocab_map.new if vocab_map.new_tokens[t] in donor_tok.vocab]
        rows = np.full((len(vocab_map.new), source_width), np.nan, dtype=np.float32)
        if in_donor:
            projected = vocab.apply_projection(mapping, vocab.read_rows(donor_reader, donor_name, [donor_tok.vocab[vocab_map.new_tokens[t]] for t in in_donor]))
            position = {t: i for i, t in enumerate(vocab_map.new)}
            rows[[position[t] for t in in_donor]] = projected
        out[name] = rows  # NaN rows (tokens the donor lacks) are filled by subword in _new_rows
        fits[name] = {"donor_tensor": donor_name, "fit_rows": len(fit_ids), "relative_residual": float(residual), "projected_tokens": len(in_donor)}
    return out, fits


def _new_rows(method: str, matrix: np.ndarray, dtype: str, source_tok, vocab_map, projected: np.ndarray | None, pieces) -> np.ndarray:
    rows = vocab.new_token_rows(method, matrix, dtype, source_tok, vocab_map, projected, pieces)
    if method == "donor-projected" and np.isnan(rows).any():  # tokens the donor lacks: subword instead
        missing = np.isnan(rows[:, 0])
        rows[missing] = vocab.subword_rows(matrix, dtype, [p for p, m in zip(pieces, missing.tolist()) if m])
    return rows


def _new_token_offset(source, reader, head_name: str, source_tok, target_tok, vocab_map, pieces, text: str, max_tokens: int) -> dict:
    """vocab.new_token_offset for the subword head rows, fitted on the calibration text (source hidden states;
    the share of new tokens in the target tokenizer's split of the same text)."""
    from tokenizers import Tokenizer as FastTokenizer

    matrix, dtype = reader.array(head_name), reader.tensors[head_name].dtype
    hidden = vocab.source_hidden_states(source, text, max_tokens)
    shared = vocab.read_rows(reader, head_name, sorted(set(vocab_map.shared.values())))
    new = vocab.subword_rows(matrix, dtype, pieces)
    ids = FastTokenizer.from_file(str(target_tok.folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids[:max_tokens]
    new_ids = set(vocab_map.new)
    rate = sum(i in new_ids for i in ids) / max(len(ids), 1)
    return vocab.new_token_offset(hidden, shared, new, rate)


def smoke_test(model, tokenizer) -> dict:
    """Greedy reply to a chat prompt with stock transformers."""
    import torch

    messages = [{"role": "user", "content": SMOKE_PROMPT}]
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    else:  # base-model tokenizers often have no chat template: the plain question then
        prompt = SMOKE_PROMPT
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    reply_ids = output[0, ids.shape[1] :]
    return {
        "loaded_with": type(model).__name__,
        "prompt": SMOKE_PROMPT,
        "reply": tokenizer.decode(reply_ids, skip_special_tokens=True).strip(),
        "new_tokens": len(reply_ids),
    }


def broken_reason(fidelity: dict | None) -> str | None:
    """What the measured fidelity shows if the model is broken (else None): the gate before exit 0."""
    if not fidelity:
        return None
    ratio, top1 = fidelity.get("bits_per_byte_ratio"), fidelity.get("top1_agreement")
    if top1 is not None and top1 < BROKEN_TOP1:
        return f"held-out top-1 agreement with the source {top1:.1%} (below {BROKEN_TOP1:.0%}), bits/byte x{ratio:.2f}"
    if ratio is not None and ratio > BROKEN_BITS_PER_BYTE_RATIO:
        return f"held-out bits/byte x{ratio:.2f} the source's (above x{BROKEN_BITS_PER_BYTE_RATIO})"
    return None


def _command_line(options: dict) -> str:
    parts = ["qwenforge", "convert", options["source"], options["out"]]
    for key in ("donor", "tokenizer", "calibration_text", "fidelity_text"):
        if options.get(key):
            parts += [f"--{key.replace('_', '-')}", options[key]]
    parts += ["--qk-norm", options["qk_norm"], "--new-token-init", options["new_token_init"], "--max-shard-size", str(options["max_shard_size"])]
    if not options["keep_bias"]:
        parts.append("--drop-bias")
    for flag in ("strict", "allow_pickle", "accept_lossy"):
        if options[flag]:
            parts.append(f"--{flag.replace('_', '-')}")
    if not options["measure"]:
        parts.append("--no-measure")
    parts += ["--formats", options.get("formats") or "none"]
    parts += ["--fidelity-tokens", str(options["fidelity_tokens"]), "--calibration-tokens", str(options["calibration_tokens"])]
    return shlex.join(parts)


@dataclass(frozen=True)
class ConvertOptions:
    """How `convert` rebuilds a checkpoint (the `qwenforge convert` flags), checked when built."""

    donor: Path | None = None
    tokenizer: Path | None = None
    keep_bias: bool = True
    qk_norm: str | None = None  # default: donor with a donor, else calibrated
    new_token_init: str | None = None  # default: donor-projected with a donor, else subword-calibrated
    calibration_text: Path | None = None
    fidelity_text: Path | None = None
    fidelity_tokens: int = 1024
    calibration_tokens: int = 1024
    max_shard_size: str | int = "5GB"
    strict: bool = False
    allow_pickle: bool = False
    measure: bool = True
    accept_lossy: bool = False
    formats: str | None = "bf16,fp16,q8_0"
    max_memory: str | int | None = None  # one loaded model's cap while measuring (checkpoint/offload.py)

    def __post_init__(self) -> None:
        from qwenforge.checkpoint.safetensors_io import parse_memory, parse_size

        if self.qk_norm is not None and self.qk_norm not in QK_NORM_METHODS:
            raise QwenforgeError(f"--qk-norm {self.qk_norm}: choose one of {', '.join(QK_NORM_METHODS)}")
        if self.new_token_init is not None and self.new_token_init not in vocab.NEW_TOKEN_METHODS:
            raise QwenforgeError(f"--new-token-init {self.new_token_init}: choose one of {', '.join(vocab.NEW_TOKEN_METHODS)}")
        for flag, count in (("--fidelity-tokens", self.fidelity_tokens), ("--calibration-tokens", self.calibration_tokens)):
            if count < 2:
                raise QwenforgeError(f"{flag} {count}: must be at least 2")
        if isinstance(self.max_shard_size, str):
            parse_size(self.max_shard_size)
        if self.formats and self.measure:  # only a measurement uses them (and imports torch)
            from qwenforge.formats import parse_formats

            parse_formats(self.formats)
        parse_memory(self.max_memory)


def convert(source: Path, out: Path, options: ConvertOptions | None = None, *, dry_run: bool = False, force: bool = False, progress=None, **fields) -> dict:
    """Convert SOURCE into a Qwen3 checkpoint at OUT; returns the tensor map (as "plan"), warnings and (unless dry_run) the metadata.

    Streams tensor by tensor: peak memory is about two embedding matrices. q/k-norm calibration
    and the fidelity measurement (`measure`) run the models, layer-offloaded when a model exceeds
    its memory cap (`max_memory`, checkpoint/offload.py). `progress(done, total, name)` is called after each
    tensor is written. A measured broken model (`broken_reason`) raises after OUT is written,
    unless `accept_lossy`; q/k/v biases are kept unless `keep_bias=False` (the card's choice). `formats`
    (compare.format_fidelity; None skips) measures both models in the formats the result will run in.
    `options` may be given as its fields: `convert(src, out, measure=False)`. Healing right after:
    `heal.convert_then_heal`.
    """
    options = options if options is not None else ConvertOptions(**fields)
    donor, tokenizer, keep_bias, qk_norm, new_token_init = options.donor, options.tokenizer, options.keep_bias, options.qk_norm, options.new_token_init
    calibration_text, fidelity_text, fidelity_tokens, calibration_tokens = options.calibration_text, options.fidelity_text, options.fidelity_tokens, options.calibration_tokens
    max_shard_size, strict, allow_pickle, measure, accept_lossy, formats = options.max_shard_size, options.strict, options.allow_pickle, options.measure, options.accept_lossy, options.formats
    max_memory = options.max_memory
    started = time.time()
    source, out = Path(source), Path(out)
    refuse_overlap(out, {"source": source, "donor": donor, "tokenizer": tokenizer, "calibration text": calibration_text, "fidelity text": fidelity_text})
    if Path(out).exists() and not force and not dry_run:
        raise QwenforgeError(f"{out}: already exists; choose another output or pass --force to replace it")
    # 1. pre-flight
    source_config = read_config(source)
    spec = spec_from_config(source_config, str(source / "config.json"))
    preflight.check_source(spec, source)
    donor_spec = donor_reader = None
    if donor is not None:
        donor = Path(donor)
        donor_spec = spec_from_config(read_config(donor), str(donor / "config.json"))
    qk_norm = qk_norm or ("donor" if donor is not None else "calibrated")
    new_token_init = new_token_init or ("donor-projected" if donor is not None else "subword-calibrated")
    warnings = preflight.check_options(spec, donor_spec, qk_norm, new_token_init, keep_bias)
    if donor_spec is not None:
        warnings += preflight.check_donor(spec, donor_spec, donor, qk_norm)
        donor_reader = MappedReader(donor)
    reader = open_source(source, allow_pickle)
    folders = {"source": source} | ({"donor": donor} if donor else {}) | ({"tokenizer": Path(tokenizer)} if tokenizer else {})
    with provenance.Hashing(folders, [info.file for info in reader.tensors.values()], enabled=not dry_run) as hashes:
        source_tok = vocab.load_tokenizer(source)
        target_dir = Path(tokenizer) if tokenizer else (donor if donor is not None else source)
        target_tok = source_tok if target_dir == source else vocab.load_tokenizer(target_dir)
        vocab.check_tokenizer(target_tok)
        donor_tok = None if donor is None else target_tok if target_dir == donor else vocab.load_tokenizer(donor)
        if target_dir == source:
            rows = spec.embedding_rows
        elif donor_spec is not None and donor_spec.embedding_rows >= len(target_tok):
            rows = donor_spec.embedding_rows
        else:
            rows = max(spec.embedding_rows, padded_rows(len(target_tok)))
        vocab_map = vocab.align(source_tok, target_tok, spec.embedding_rows, rows)
        # 2. tensor map
        donor_layers = donor_spec.layers if donor_spec is not None and qk_norm == "donor" else None
        tensor_map = build_tensor_map(reader.tensors, spec, rows, keep_bias, qk_norm, new_token_init, not vocab_map.identity, source, donor_layers)
        bias_dropped = _bias_record(reader, tensor_map)
        if bias_dropped and bias_dropped["max_norm"] > 0:
            warnings.append(
                {"code": "bias-dropped", "message": f"{bias_dropped['count']} attention biases dropped (largest norm {bias_dropped['max_norm']:.4g}); outputs change (without --drop-bias they are kept exactly)"}
            )
        preflight.apply_strict(warnings, strict)
        attention_bias = keep_bias and (spec.qkv_bias or spec.o_bias)
        token_ids = _remap_ids(source_config, source_tok, target_tok)
        target_config = qwen3_config(source_config, spec, rows, attention_bias, token_ids)
        vocabulary = vocab.summary(vocab_map, source_tok, target_tok, new_token_init)
        special_tokens = vocab.special_token_map(source_tok, target_tok, vocab_map, new_token_init)
        calibration_file = Path(calibration_text) if calibration_text else default_text("calibration.txt")
        fidelity_file = Path(fidelity_text) if fidelity_text else default_text("heldout.txt")
        texts = {"calibration": read_text(calibration_file, "calibration text"), "fidelity": read_text(fidelity_file, "fidelity text")}
        options = {
            "source": str(source), "out": str(out), "donor": str(donor) if donor else None, "tokenizer": str(tokenizer) if tokenizer else None,
            "keep_bias": keep_bias, "qk_norm": qk_norm, "new_token_init": new_token_init,
            "calibration_text": str(calibration_text) if calibration_text else None, "fidelity_text": str(fidelity_text) if fidelity_text else None,
            "fidelity_tokens": fidelity_tokens, "calibration_tokens": calibration_tokens, "max_shard_size": max_shard_size, "strict": strict, "allow_pickle": allow_pickle, "measure": measure, "accept_lossy": accept_lossy, "formats": formats,
        }
        options["command"] = _command_line(options)
        result = {"plan": tensor_map, "warnings": warnings, "config": target_config, "vocabulary": vocabulary, "special_tokens": special_tokens}
        if dry_run:
            return result

        # 3. prepare what cannot be streamed: calibrated norms, projected new-token rows
        source_model = None
        norms = {}
        if qk_norm == "calibrated":
            from qwenforge import compare
            from qwenforge.convert.qk_norm import calibrate

            source_model = compare.load(source, max_memory)
            biases = {name: reader.get(name) for name in reader.tensors if name.endswith(("q_proj.bias", "k_proj.bias"))}
            norms = calibrate(source_model, texts["calibration"], keep_bias, max_tokens=calibration_tokens, biases=biases)
        matrices = [s.name for s in tensor_map["steps"] if s.op == "transplant-rows"]
        projected, projection_fits = _donor_projections(
            new_token_init, reader, donor_reader, source_tok, donor_tok, target_tok, vocab_map, matrices, bool(donor_spec and donor_spec.tied_embeddings)
        )
        pieces = None
        if vocab_map.new and (new_token_init in ("subword", "subword-calibrated") or any(np.isnan(rows).any() for rows in projected.values())):
            pieces = vocab.subword_pieces(source_tok, [vocab_map.new_tokens[t] for t in vocab_map.new], target_tok)
        head_name = "lm_head.weight" if "lm_head.weight" in matrices else "model.embed_tokens.weight"
        offset = None
        if vocab_map.new and new_token_init == "subword-calibrated" and head_name in matrices:  # loads the source model (torch)
            offset = _new_token_offset(source_model or source, reader, head_name, source_tok, target_tok, vocab_map, pieces, texts["calibration"], calibration_tokens)

        spans = hasattr(reader, "span")  # a pickle source has no byte spans to copy

        def parts(step) -> list:
            """The output tensor as writer parts. Unchanged bytes (whole tensors, shared vocabulary
            runs) are spans the kernel copies, as `cp` does; only what changes streams through Python,
            as numpy, so a conversion without calibration or measurement never imports torch."""
            if step.op == "copy":
                return [reader.span(step.source) if spans else reader.array(step.source)]
            if step.op == "transplant-rows":
                matrix, dtype = reader.array(step.source), reader.tensors[step.source].dtype
                new = _new_rows(new_token_init, matrix, dtype, source_tok, vocab_map, projected.get(step.name), pieces)
                if offset is not None and step.name == head_name:
                    new = new + offset["offset"] * offset["direction"]
                return vocab.transplant_parts(reader, step.source, vocab_map, new)
            if step.op == "donor":
                donor_name = step.source.removeprefix("donor:")
                raw, dtype = donor_reader.array(donor_name), donor_reader.tensors[donor_name].dtype
                return [raw if dtype == step.dtype else from_float32(to_float32(raw, dtype), step.dtype)]
            if step.op == "calibrated":
                return [norms[step.name].to(torch_dtype(step.dtype))]
            if step.op in ("ones", "zeros"):
                return [from_float32(np.full(step.shape, 1.0 if step.op == "ones" else 0.0, dtype=np.float32), step.dtype)]
            raise AssertionError(f"unknown tensor-map op {step.op}")

        # 4. stream into a temporary folder; 5. check; 6. provenance; rename
        try:
            with atomic_output(out, force) as temp:
                writer = ShardedWriter(temp, [(s.name, s.shape, s.dtype) for s in tensor_map["steps"]], max_shard_size)
                for done, step in enumerate(tensor_map["steps"], 1):
                    writer.write_parts(step.name, parts(step))
                    if step.source in reader.tensors and hasattr(reader, "release"):
                        reader.release(step.source)  # pages this step touched (mapped source)
                    if progress:
                        progress(done, len(tensor_map["steps"]), step.name)
                writer.close()
                write_json(temp / "config.json", target_config)
                copy_tokenizer_files(target_dir, temp)
                generation = json.loads((source / "generation_config.json").read_text()) if (source / "generation_config.json").exists() else {}
                generation.update(_remap_ids(generation, source_tok, target_tok) or token_ids)
                generation.pop("transformers_version", None)
                write_json(temp / "generation_config.json", generation)
                extra = {"vocabulary": vocabulary, "bias_dropped": bias_dropped, "projection": projection_fits, "calibration_text": str(calibration_file)}
                if offset is not None:
                    extra["new_token_offset"] = {key: value for key, value in offset.items() if key != "direction"}
                if donor_layers is not None:
                    extra["donor_layer_map"] = donor_layer_map(spec.layers, donor_layers)
                measure_failure = None
                if measure:
                    try:
                        extra.update(_measure(temp, source_model or source, texts["fidelity"], fidelity_tokens, formats, max_memory))
                        extra["fidelity"]["text"] = fidelity_file.name if not fidelity_text else str(fidelity_file)
                        extra["broken"] = broken_reason(extra["fidelity"])
                    except Exception as error:  # noqa: BLE001 - a failed check must not cost the finished conversion
                        measure_failure = error
                        extra["measure_error"] = f"{type(error).__name__}: {error}"
                inputs = hashes.results()
                extra["seconds"] = round(time.time() - started, 2)
                record = provenance.metadata(options, inputs, tensor_map, warnings, special_tokens, extra)
                provenance.write_provenance(temp, record, config_diff(source_config, target_config), source.name)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise QwenforgeError(f"{out}: disk full while writing; free space (the output needs about the source's size) and retry") from error
            raise
        if measure_failure is not None:
            raise QwenforgeError(
                f"{out}: converted and kept, but its measurement failed ({extra['measure_error']}); "
                f"measure it with `qwenforge compare {source} {out} --text FILE`"
            ) from measure_failure
        result["metadata"] = record
        result["out"] = out
        if record.get("broken") and not accept_lossy:
            raise QwenforgeError(
                f"{out}: converted but broken: {record['broken']}; heal it (`qwenforge heal {out} HEALED --teacher {source}`, "
                "or convert with --heal) or pass --accept-lossy to keep it as it is (the folder is kept)"
            )
        return result


def convert_lines(record: dict, heal_method: str | None = None) -> str:
    """Human lines for a conversion's metadata (what `qwenforge convert` prints)."""
    from qwenforge.compare import formats_table, summary_line

    lines = [f"[yellow]warning:[/yellow] {warning['message']}" for warning in record["warnings"]]
    lines.append(f"vocabulary: {record['vocabulary']['summary']}")
    if record.get("smoke_test"):
        lines.append(f"smoke test: {record['smoke_test']['prompt']!r} -> {record['smoke_test']['reply']!r}")
    if record.get("fidelity"):
        lines.append(f"fidelity vs source: {summary_line(record['fidelity'])}")
        if record["fidelity"].get("formats"):
            lines.append(formats_table(record["fidelity"]["formats"]))
    if record.get("heal"):
        healed = record["heal"]
        lines.append(f"healed ({heal_method}): held-out top-1 {healed['top1_agreement']:.1%}, bits/byte {healed['bits_per_byte']:.4f}")
    return "\n".join(lines)


def _measure(folder: Path, source, text: str, fidelity_tokens: int, formats: str | None = None, max_memory: str | int | None = None) -> dict:
    """Smoke test and fidelity (on `text`, and per format in `formats`) of the converted model in `folder` against the source."""
    from qwenforge import compare

    converted = compare.load(folder, max_memory)
    reference = compare.load(source, max_memory)
    fidelity = compare.fidelity(reference, converted, text, max_tokens=fidelity_tokens)
    if formats:
        from qwenforge.formats import parse_formats

        fidelity["formats"] = compare.format_fidelity(reference, converted, text, parse_formats(formats)[0], max_tokens=fidelity_tokens)
    return {"smoke_test": smoke_test(*converted), "fidelity": fidelity}
