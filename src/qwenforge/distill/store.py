"""The top-k logit store: a teacher's next-token log-probabilities on disk (written by distill/capture.py).

Layout of a store folder: `index.json` (teacher, tokenizer hash, k, value encoding, shards,
`complete`) and `shard-NNNNN.safetensors` files, each holding `input_ids` [S, L+1], `indices`
[S, L, k] and `values` [S, L, k] for S sequences. A shard is written to a temporary name and
renamed, then the index is rewritten, so a killed capture resumes from its last complete shard.

Values: `float16` log-probabilities, or `uint8` (log-probability quantized on a fixed square-root
scale over [-LOG_FLOOR, 0], finer near 0 where the mass is).

Compression `none` (the plain layout): entries in rank order, indices int16 (offset by 32,768) when
the vocabulary fits in 16 bits, else int32. Compression `zlib` or `lzma` (stdlib, lossless): each
position's entries are sorted by token id and the ids stored as gaps (small numbers), every array is
split into byte planes (the high bytes of small numbers are runs of zeros) and compressed; each
tensor is then a 1-D uint8 blob and the shard's safetensors metadata holds the shapes. Decoding puts
the entries back in rank order, so readers see the same tensors in every layout. Measured on the
embedded teacher (benchmarks/distill_store.py, vocabulary 49,152, input ids included), k=128:
uint8 244 bytes/token with zlib, 225 with lzma, 388 plain; float16 316 / 303 / 516 plain.
A 151,936-token vocabulary spreads the ids wider: expect more bytes for the ids (not measured).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenforge.checkpoint.folder import read_json
from qwenforge import fidelity as figures
from qwenforge.distill import engine
from qwenforge.errors import QwenforgeError

INDEX = "index.json"
VALUE_ENCODINGS = ("float16", "uint8")
COMPRESSIONS = ("none", "zlib", "lzma")
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


def _compress(data: bytes, compression: str) -> bytes:
    return zlib.compress(data, 6) if compression == "zlib" else lzma.compress(data)


def _decompress(data: bytes, compression: str) -> bytes:
    return zlib.decompress(data) if compression == "zlib" else lzma.decompress(data)


def _pack(array: torch.Tensor, compression: str) -> torch.Tensor:
    """Byte planes of a little-endian integer/float array, compressed, as a 1-D uint8 tensor."""
    raw = array.contiguous().view(torch.uint8).reshape(-1, array.element_size()).T.contiguous()
    return torch.frombuffer(bytearray(_compress(raw.numpy().tobytes(), compression)), dtype=torch.uint8)


def _unpack(blob: torch.Tensor, compression: str, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(_decompress(blob.numpy().tobytes(), compression)), dtype=torch.uint8)
    width = torch.empty(0, dtype=dtype).element_size()
    return raw.reshape(width, -1).T.contiguous().view(dtype).reshape(shape)


def encode_shard(ids: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, encoding: str, compression: str) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of one shard: ids [S, L+1], top-k indices and log-probs [S, L, k]."""
    values = encode_values(logprobs, encoding)
    if compression == "none":
        return {"input_ids": ids.to(torch.int32), "indices": encode_indices(indices, vocab_size), "values": values}, {}
    sorted_ids, order = indices.to(torch.int32).sort(-1)
    gaps = torch.diff(sorted_ids, dim=-1, prepend=torch.zeros_like(sorted_ids[..., :1]))
    tensors = {
        "input_ids": _pack(ids.to(torch.int32), compression),
        "indices": _pack(gaps, compression),
        "values": _pack(values.gather(-1, order), compression),
    }
    return tensors, {"shapes": json.dumps({"input_ids": list(ids.shape), "topk": list(indices.shape)})}  # one key: byte-identical shards


def decode_shard(tensors: dict, metadata: dict, index: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, indices, log-probabilities) in rank order (highest first), whatever the layout."""
    compression = index.get("compression", "none")
    if compression == "none":
        return tensors["input_ids"].long(), decode_indices(tensors["indices"]), decode_values(tensors["values"], index["values"])
    shapes = json.loads(metadata["shapes"])
    topk_shape = shapes["topk"]
    ids = _unpack(tensors["input_ids"], compression, torch.int32, shapes["input_ids"]).long()
    indices = _unpack(tensors["indices"], compression, torch.int32, topk_shape).long().cumsum(-1)
    value_dtype = torch.float16 if index["values"] == "float16" else torch.uint8
    logprobs = decode_values(_unpack(tensors["values"], compression, value_dtype, topk_shape), index["values"])
    logprobs, order = logprobs.sort(dim=-1, descending=True, stable=True)
    return ids, indices.gather(-1, order), logprobs


def read_text(path: Path) -> str:
    """A .txt file, or a .jsonl file whose records carry a "text" field (joined by blank lines)."""
    from qwenforge.files import read_text as read_file

    path = Path(path)
    content = read_file(path, "data file")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as error:
                    raise QwenforgeError(f"{path}:{number}: expected a JSON object with a \"text\" field") from error
                if not isinstance(text, str):
                    raise QwenforgeError(f"{path}:{number}: \"text\" must be a string, got {text!r}")
                texts.append(text)
        return "\n\n".join(texts)
    return content


def bytes_per_token(k: int, vocab_size: int, encoding: str) -> int:
    """Bytes per position of the plain layout (indices + values; the input ids add 4 per token)."""
    return k * ((2 if vocab_size <= 1 << 16 else 4) + (2 if encoding == "float16" else 1))


def open_store(folder: Path, student_tokenizer=None, min_coverage: float = 0.95) -> dict:
    """The index of a complete store, checked against the student's tokenizer.

    Another tokenizer is mapped by token string (distill/mapping.py): the index then carries
    `student_map` (coverage and counts) and `iterate_store` yields student ids; a student that
    tokenizes the text differently or covers less than `min_coverage` of the mass is refused.
    """
    folder = Path(folder)
    index = read_json(folder / INDEX)
    if not index.get("complete"):
        raise QwenforgeError(f"{folder}: the capture is unfinished; run `qwenforge distill capture ... --resume` to complete it")
    if student_tokenizer is not None and tokenizer_hash(student_tokenizer) != index["tokenizer_hash"]:
        from qwenforge.distill import mapping

        table, facts = mapping.build(folder, index, student_tokenizer, iterate_store(folder, index), min_coverage)
        index = {**index, "student_map": facts, "_student_ids": table}
    return index


def iterate_store(folder: Path, index: dict) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids [S, L+1], indices [S, L, k], log-probabilities [S, L, k]) per shard, checked for damage.

    Entries are in rank order (highest first). With an index `open_store` mapped to another
    vocabulary, ids are the student's and tokens it lacks come last with log-probability -inf.
    """
    for number in range(len(index["shards"])):
        yield read_shard(folder, index, number)


def read_shard(folder: Path, index: dict, number: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shard `number` of the store as `iterate_store` yields it (one shard in memory, not the store)."""
    from safetensors import SafetensorError, safe_open

    shard = index["shards"][number]
    path = Path(folder) / shard["file"]
    if not path.exists() or path.stat().st_size != shard["bytes"]:
        raise QwenforgeError(f"{path}: missing or truncated shard; re-run the capture with --resume after deleting it from {INDEX}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        decoded = decode_shard(tensors, metadata, index)
    except (SafetensorError, OSError, zlib.error, lzma.LZMAError, KeyError, RuntimeError) as error:
        raise QwenforgeError(f"{path}: unreadable shard ({error}); capture again") from error
    if "_student_ids" in index:
        from qwenforge.distill import mapping

        table = index["_student_ids"]
        decoded = (mapping.map_input_ids(table, decoded[0], str(path)), *mapping.map_entries(table, decoded[1], decoded[2]))
    return decoded


def rebuilt_logprobs(indices: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """A full distribution from stored top-k entries, the tail mass spread evenly over the other tokens.

    Absent entries (log-probability -inf: a token the student's vocabulary lacks, mapping.py) are
    written to an extra column that is then dropped, so they never overwrite a listed token.
    """
    kept = logprobs.float().clamp(max=0)
    present = torch.isfinite(kept)
    tail = (1 - kept.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
    others = (vocab - present.sum(-1, keepdim=True)).clamp(min=1)
    rebuilt = (tail / others).log().expand(*indices.shape[:-1], vocab + 1).clone()
    rebuilt.scatter_(-1, indices.long().where(present, vocab), kept)
    rebuilt = rebuilt[..., :vocab]
    return rebuilt - torch.logsumexp(rebuilt, -1, keepdim=True)


def store_targets(indices: torch.Tensor, values: torch.Tensor, shared: torch.Tensor, teacher_rows: int, extra: int):
    """Stored top-k in the shared vocabulary: entries outside it point at column `extra` with no mass (they join the tail)."""
    mask = torch.zeros(max(teacher_rows, int(indices.max()) + 1), dtype=torch.bool, device=indices.device)
    mask[shared] = True
    keep = mask[indices]
    return indices.where(keep, torch.full_like(indices, extra)), values.where(keep, torch.full_like(values, -1e4))


def shared_logits(logits: torch.Tensor, shared_mask: torch.Tensor) -> torch.Tensor:
    """Student logits with ids outside the shared vocabulary (and one extra column, see `store_targets`) at no mass."""
    masked = logits.float().masked_fill(~shared_mask, -1e4)
    return torch.cat([masked, torch.full_like(masked[..., :1], -1e4)], -1)


def store_fidelity(student, sequences, indices, logprobs, byte_counts, teacher_rows: int | None = None, shared: torch.Tensor | None = None) -> dict:
    """Held-out figures against a store, for `distill train` and `heal --teacher-logits`:
    `fidelity.Fidelity` on the rebuilt teacher distribution (agreement, bits per byte, perplexity) and
    KL on the stored top-k plus one tail bucket (zero when the student is the teacher).

    `shared` (ids both vocabularies hold, after a transplant) keeps KL and agreement to those ids;
    stored entries outside it join the tail. `teacher_rows` defaults to the student's.
    """
    fidelity, kl = figures.Fidelity(), 0.0
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    student_rows = student.get_output_embeddings().weight.shape[0]
    rows = teacher_rows or student_rows
    if shared is not None:
        mask = torch.zeros(student_rows, dtype=torch.bool, device=device)
        mask[shared] = True
    with torch.no_grad():
        for ids, top_indices, top_logprobs, nbytes in zip(sequences, indices, logprobs, byte_counts):
            ids, top_indices, top_logprobs = ids.to(device), top_indices.to(device), top_logprobs.to(device)
            logits = student(ids[None, :-1]).logits[0]
            targets = (logits, top_indices, top_logprobs)
            if shared is not None:
                targets = (shared_logits(logits, mask), *store_targets(top_indices, top_logprobs, shared, rows, student_rows))
            kl += float(engine.topk_divergence(*targets).sum())
            fidelity.add(logits, rebuilt_logprobs(top_indices, top_logprobs, rows), ids[1:], nbytes, shared)
    student.train(was_training)
    return {**fidelity.summary(), "kl": kl / fidelity.positions}


def reconstruction_kl(teacher_logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(full teacher || store), the store's tail mass spread evenly over the tokens it does not list."""
    full = F.log_softmax(teacher_logits.float(), -1)
    return (full.exp() * (full - rebuilt_logprobs(indices, logprobs, full.shape[-1]))).sum(-1)
