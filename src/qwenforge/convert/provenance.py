"""What a conversion leaves beside its weights: conversion_metadata.json, config_diff.json, README.md.

The metadata is the recipe (qwenforge version, every option, sha256 of every input file) and
the record (per-tensor operations, dropped tensors, warnings, special-token map, smoke test,
measured fidelity); the model card says the same in prose.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwenforge import __version__
from qwenforge.checkpoint.folder import sha256_of, write_json

METADATA_NAME = "conversion_metadata.json"
CONFIG_DIFF_NAME = "config_diff.json"


def input_files(folder: Path) -> list[Path]:
    """The files of an input folder worth fingerprinting (weights, configs, tokenizer)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def _stamp(file: Path) -> list[int]:
    """What changes whenever a file's bytes do: device, inode, size, modification and change times
    (ctime cannot be set back by hand), as git's index and rsync trust."""
    info = file.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _known_file() -> Path:
    from qwenforge.cache import cache_root

    return cache_root() / "sha256.json"


def _read_known() -> dict:
    try:
        return json.loads(_known_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_known(known: dict) -> None:
    """Written whole and renamed into place: a reader never sees half a file."""
    file = _known_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temp = file.with_name(f".{file.name}.{os.getpid()}")
        temp.write_text(json.dumps({path: entry for path, entry in known.items() if os.path.exists(path)}))
        temp.replace(file)
    except OSError:  # a read-only cache costs only the next run's hashing
        pass


class Hashing:
    """sha256 of every input file on worker threads (hashlib releases the GIL), overlapping the conversion.

    Started before the tokenizers are parsed, so hashing, the slowest reader of the shards, has
    the most time. Files in `first` (the source shards in the order the conversion reads them) are
    hashed in that order, so hashing and copying read each shard at about the same time and the
    disk serves it once: a model larger than the page cache is otherwise read twice, which doubled
    the wall time at 20 GB. A core stays with the copy. Leaving the `with` block early (an error)
    stops the workers within one block instead of finishing every file. A file hashed before and
    unchanged since (same `_stamp`) is not read again: the digests are kept in the cache folder, so
    converting the same source again with other options skips the hashing.
    """

    def __init__(self, folders: dict[str, Path], first: list[Path] = (), enabled: bool = True):
        self.folders = folders
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=min(4, max(1, (os.cpu_count() or 1) - 1)))
        self._known = _read_known() if enabled else {}
        rank = {Path(file).resolve(): position for position, file in enumerate(dict.fromkeys(first))}
        jobs = [(role, file) for role, folder in folders.items() for file in input_files(folder)] if enabled else []
        jobs.sort(key=lambda job: rank.get(job[1].resolve(), len(rank)))
        self._futures = {(role, file.name): self._pool.submit(self._sha256, file) for role, file in jobs}

    def _sha256(self, file: Path) -> str | None:
        key, stamp = str(file.resolve()), _stamp(file)
        if self._known.get(key, {}).get("stamp") == stamp:
            return self._known[key]["sha256"]
        digest = sha256_of(file, stop=self._stop)
        if digest is not None:
            self._known[key] = {"stamp": stamp, "sha256": digest}
        return digest

    def results(self) -> dict:
        """{role: {"path", "sha256": {file name: hex}}}, waiting for the workers."""
        out = {}
        for role, folder in self.folders.items():
            files = dict(sorted((name, future.result()) for (owner, name), future in self._futures.items() if owner == role))
            out[role] = {"path": str(Path(folder).resolve()), "sha256": files}
        _write_known(self._known)
        return out

    def __enter__(self) -> "Hashing":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def metadata(options: dict, inputs: dict, tensor_map: dict, warnings: list, special_tokens: list, extra: dict) -> dict:
    return {
        "qwenforge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": options,
        "inputs": inputs,
        "tensors": [step.to_dict() for step in tensor_map["steps"]],
        "dropped": tensor_map["dropped"],
        "warnings": warnings,
        "special_tokens": special_tokens,
        **extra,
    }


def _fidelity_lines(fidelity: dict | None, error: str | None = None) -> list[str]:
    if error:
        return [f"The measurement failed ({error}); run `qwenforge compare SOURCE THIS --text FILE`."]
    if not fidelity:
        return ["Fidelity was not measured (`--no-measure`); run `qwenforge compare SOURCE THIS --text FILE`."]
    ref, cand = fidelity["reference"], fidelity["candidate"]
    lines = [
        f"Measured against the source on `{fidelity.get('text', 'the evaluation text')}` ({fidelity['text_bytes']} bytes):",
        "",
        "| metric | source | converted |",
        "|---|---|---|",
        f"| bits per byte | {ref['bits_per_byte']:.4f} | {cand['bits_per_byte']:.4f} |",
    ]
    if fidelity["same_tokenization"]:
        lines += [
            f"| perplexity | {ref['perplexity']:.3f} | {cand['perplexity']:.3f} |",
            f"| KL(source ‖ converted), mean per token | | {fidelity['kl']:.4f} |",
            f"| top-1 agreement with the source | | {100 * fidelity['top1_agreement']:.1f}% |",
        ]
    return lines + format_lines(fidelity.get("formats"))


def format_lines(formats: dict | None) -> list[str]:
    """The per-format table (`compare --formats`): each model against the source put in the same format."""
    from qwenforge.compare import top1_cells

    if not formats:
        return []
    lines = ["", "In the formats it will be run in (each against the source in the same format; top-1 against the float32 source):", "",
             "| format | top-1, source in it | top-1, this model in it | bits/byte ratio to the source in it |", "|---|---|---|---|"]
    for name, row in formats.items():
        if name == "lora":
            continue
        top1 = top1_cells(row)
        lines.append(f"| {name} | {top1[0]} | {top1[1]} | x{row['bits_per_byte_ratio']:.4f} |")
    if "lora" in formats:
        lora = formats["lora"]
        lines += ["", f"After {lora['steps']} LoRA steps (r={lora['rank']}, lr {lora['learning_rate']:g}, same data): held-out bits/byte "
                  f"source {lora['source_before']:.4f} -> {lora['source_after']:.4f}, this model {lora['candidate_before']:.4f} -> {lora['candidate_after']:.4f}."]
    return lines


def model_card(record: dict, source_name: str) -> str:
    """README.md of the converted folder: what was done, what it cost, how to repeat it."""
    options = record["options"]
    counts: dict[str, int] = {}
    for step in record["tensors"]:
        counts[step["op"]] = counts.get(step["op"], 0) + 1
    lines = [
        f"# {Path(options['out']).name}",
        "",
        f"`{source_name}` rebuilt in the Qwen3 architecture by qwenforge {record['qwenforge_version']} "
        "(stock `Qwen3ForCausalLM`, no custom code).",
        "",
        "## What was done",
        "",
        "- tensors: " + ", ".join(f"{count} {op}" for op, count in sorted(counts.items())),
        f"- q/k-norm: {options['qk_norm']}; attention biases: {'kept exactly (attention_bias=True, zero o_proj bias)' if options['keep_bias'] else 'dropped'}",
        f"- vocabulary: {record['vocabulary']['summary']}",
        f"- dropped tensors: {len(record['dropped'])}"
        + (f" (largest dropped bias norm {record['bias_dropped']['max_norm']:.4g})" if record.get("bias_dropped") else ""),
        "",
        "## Fidelity",
        "",
        *_fidelity_lines(record.get("fidelity"), record.get("measure_error")),
        *(["", f"**Broken:** {record['broken']}. Heal it (`qwenforge heal`) before use."] if record.get("broken") else []),
        "",
        "## Smoke test",
        "",
        f"Prompt `{record['smoke_test']['prompt']}` -> `{record['smoke_test']['reply']}`" if record.get("smoke_test") else "not run",
        "",
        "## Warnings",
        "",
        *([f"- {w['message']} [{w['code']}]" for w in record["warnings"]] or ["none"]),
        "",
        "## Reproduce",
        "",
        "```",
        options["command"],
        "```",
        "",
        f"Inputs are fingerprinted (sha256) in `{METADATA_NAME}`; the config change is in `{CONFIG_DIFF_NAME}`.",
        "",
    ]
    return "\n".join(lines)


def write_provenance(folder: Path, record: dict, diff: dict, source_name: str) -> None:
    write_json(Path(folder) / METADATA_NAME, record)
    write_json(Path(folder) / CONFIG_DIFF_NAME, diff)
    (Path(folder) / "README.md").write_text(model_card(record, source_name))
