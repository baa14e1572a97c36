"""`qwenforge distill capture`: a teacher's top-k next-token log-probabilities, stored once on disk.

Layout of a store folder: `index.json` (teacher, tokenizer hash, k, value encoding, shards,
`complete`) and `shard-NNNNN.safetensors` files, each holding `input_ids` [S, L+1], `indices`
[S, L, k] and `values` [S, L, k] for S sequences. A shard is written to a temporary name and
renamed, then the index is rewritten, so a killed capture resumes from its last complete shard.

Values: `float16` log-probabilities, or `uint8` (log-probability quantized on a fixed square-root
scale over [-LOG_FLOOR, 0], finer near 0 where the mass is). Indices are int16 (offset by 32,768) when
the vocabulary fits in 16 bits, else int32.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenforge import __version__
from qwenforge.checkpoint.folder import read_json, write_json
from qwenforge.distill import engine
from qwenforge.errors import QwenforgeError

INDEX = "index.json"
VALUE_ENCODINGS = ("float16", "uint8")
LOG_FLOOR = 30.0  # nats; uint8 values below exp(-30) are clamped


def tokenizer_hash(tokenizer) -> str:
    """Identity of a (loaded) tokenizer: sha256 of its vocabulary, so stores cannot mix tokenizers."""
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def same_vocabulary(folder: Path, tokenizer) -> bool:
    """Whether the tokenizer of checkpoint `folder` has the loaded `tokenizer`'s vocabulary (file identity first: cheap)."""
    from transformers import AutoTokenizer

    from qwenforge.checkpoint.folder import sha256_of

    own = Path(getattr(tokenizer, "name_or_path", "")) / "tokenizer.json"
    theirs = Path(folder) / "tokenizer.json"
    if own.exists() and theirs.exists() and sha256_of(own) == sha256_of(theirs):
        return True
    return tokenizer_hash(AutoTokenizer.from_pretrained(folder)) == tokenizer_hash(tokenizer)


def encode_values(logprobs: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "float16":
        return logprobs.to(torch.float16)
    scaled = (-logprobs.clamp(min=-LOG_FLOOR) / LOG_FLOOR).sqrt() * 255
    return scaled.round().to(torch.uint8)


def decode_values(values: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding == "float16":
        return values.float()
    return -((values.float() / 255) ** 2) * LOG_FLOOR


def encode_indices(indices: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if vocab_size <= 1 << 16:
        return (indices.to(torch.int32) - (1 << 15)).to(torch.int16)  # offset: ids up to 65,535 fit
    return indices.to(torch.int32)


def decode_indices(stored: torch.Tensor) -> torch.Tensor:
    if stored.dtype == torch.int16:
        return stored.to(torch.int64) + (1 << 15)
    return stored.to(torch.int64)


def read_text(path: Path) -> str:
    """A .txt file, or a .jsonl file whose records carry a "text" field (joined by blank lines)."""
    path = Path(path)
    if not path.exists():
        raise QwenforgeError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as error:
                    raise QwenforgeError(f"{path}:{number}: expected a JSON object with a \"text\" field") from error
        return "\n\n".join(texts)
    return path.read_text()


def bytes_per_token(k: int, vocab_size: int, encoding: str) -> int:
    """Stored bytes per position (indices + values; the input ids add 4 per token)."""
    return k * ((2 if vocab_size <= 1 << 16 else 4) + (2 if encoding == "float16" else 1))


def capture(
    teacher_dir: Path,
    data: Path,
    out: Path,
    *,
    k: int = 64,
    sequence_length: int = 512,
    shard_sequences: int = 64,
    encoding: str = "float16",
    max_tokens: int | None = None,
    resume: bool = False,
    force: bool = False,
    console=None,
) -> dict:
    """Run the teacher once over DATA and store its top-k log-probabilities in OUT; returns the index."""
    from rich.progress import Progress
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out = Path(teacher_dir), Path(out)
    if encoding not in VALUE_ENCODINGS:
        raise QwenforgeError(f"--values {encoding}: choose one of {', '.join(VALUE_ENCODINGS)}")
    index_path = out / INDEX
    if out.exists() and not resume:
        if not force:
            raise QwenforgeError(f"{out}: already exists; pass --resume to continue a capture or --force to replace it")
        for item in out.glob("shard-*.safetensors"):
            item.unlink()
        index_path.unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    sequences = engine.token_sequences(tokenizer, read_text(data), sequence_length, max_tokens, str(data))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab_size = teacher.config.vocab_size
    if not 0 < k <= vocab_size:
        raise QwenforgeError(f"--k {k}: must be between 1 and the vocabulary size {vocab_size}")
    header = {
        "qwenforge_version": __version__,
        "teacher": str(teacher_dir),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data": str(data),
        "vocab_size": vocab_size,
        "k": k,
        "values": encoding,
        "sequence_length": len(sequences[0]) - 1,
        "sequences": len(sequences),
        "bytes_per_token": bytes_per_token(k, vocab_size, encoding),
    }
    if resume and index_path.exists():
        index = read_json(index_path)
        changed = [key for key in ("tokenizer_hash", "k", "values", "sequence_length", "sequences") if index.get(key) != header[key]]
        if changed:
            raise QwenforgeError(f"{out}: the existing capture differs in {', '.join(changed)}; capture to a new folder or pass --force")
    else:
        out.mkdir(parents=True, exist_ok=True)
        index = {**header, "shards": [], "complete": False}
        write_json(index_path, index)
    done = sum(shard["sequences"] for shard in index["shards"])
    with Progress(console=console, disable=console is None) as progress:
        task = progress.add_task("capture", total=len(sequences), completed=done)
        while done < len(sequences):
            chunk = sequences[done : done + shard_sequences]
            ids = torch.stack([s for s in chunk if len(s) == len(chunk[0])])
            with torch.no_grad():
                logprobs = F.log_softmax(teacher(ids[:, :-1]).logits.float(), -1)
            top_values, top_indices = logprobs.topk(k, dim=-1)
            name = f"shard-{len(index['shards']):05d}.safetensors"
            temporary = out / f".{name}.tmp"
            save_file(
                {"input_ids": ids.to(torch.int32), "indices": encode_indices(top_indices, vocab_size), "values": encode_values(top_values, encoding)},
                str(temporary),
            )
            os.replace(temporary, out / name)
            index["shards"].append({"file": name, "sequences": len(ids), "bytes": (out / name).stat().st_size})
            done += len(chunk)
            write_json(index_path, index)
            progress.update(task, completed=done)
    index["complete"] = True
    index["tokens"] = sum(shard["sequences"] for shard in index["shards"]) * index["sequence_length"]
    index["bytes_on_disk_per_token"] = sum(shard["bytes"] for shard in index["shards"]) / max(index["tokens"], 1)
    write_json(index_path, index)
    return index


def open_store(folder: Path, student_tokenizer=None) -> dict:
    """The index of a complete store; refuses an unfinished capture or another tokenizer's store."""
    folder = Path(folder)
    index = read_json(folder / INDEX)
    if not index.get("complete"):
        raise QwenforgeError(f"{folder}: the capture is unfinished; run `qwenforge distill capture ... --resume` to complete it")
    if student_tokenizer is not None and tokenizer_hash(student_tokenizer) != index["tokenizer_hash"]:
        raise QwenforgeError(f"{folder}: captured with another tokenizer than the student's; capture with the student's vocabulary")
    return index


def iterate_store(folder: Path, index: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids [S, L+1], indices [S, L, k], log-probabilities [S, L, k]) per shard, checked for damage."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for shard in index["shards"]:
        path = Path(folder) / shard["file"]
        if not path.exists() or path.stat().st_size != shard["bytes"]:
            raise QwenforgeError(f"{path}: missing or truncated shard; re-run the capture with --resume after deleting it from {INDEX}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise QwenforgeError(f"{path}: unreadable shard ({error}); capture again") from error
        yield tensors["input_ids"].long(), decode_indices(tensors["indices"]), decode_values(tensors["values"], index["values"])


def reconstruction_kl(teacher_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(full teacher || store), the store's tail mass spread evenly over the tokens it does not list."""
    full = F.log_softmax(teacher_logits.float(), -1)
    vocab = full.shape[-1]
    k = indices.shape[-1]
    kept = logprobs.float().clamp(max=0)
    tail = (1 - kept.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
    rebuilt = (tail / (vocab - k)).log().expand_as(full).clone()
    rebuilt.scatter_(-1, indices.long(), kept)
    rebuilt = rebuilt - torch.logsumexp(rebuilt, -1, keepdim=True)
    return (full.exp() * (full - rebuilt)).sum(-1)
