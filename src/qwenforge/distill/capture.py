"""`qwenforge distill capture`: run a teacher once over a text and keep its top-k log-probabilities.

    qwenforge distill capture TEACHER --data corpus.txt --out STORE --k 64

The store's layout and codec are distill/store.py's; this module runs the teacher (in process, or
vLLM for large teachers) and writes shard after shard, resumable from the last complete one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenforge import __version__
from qwenforge.checkpoint.folder import read_json, write_json
from qwenforge.distill.store import COMPRESSIONS, INDEX, VALUE_ENCODINGS, bytes_per_token, encode_shard, read_text, tokenizer_hash
from qwenforge.errors import QwenforgeError
from qwenforge.fidelity import token_sequences


ENGINES = ("transformers", "vllm")


def _transformers_teacher(teacher_dir: Path):
    """(vocab size, top_k(ids [S, L+1], k) -> (indices, log-probs) [S, L, k]) of an in-process teacher."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()

    def top_k(ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logprobs = F.log_softmax(teacher(ids[:, :-1]).logits.float(), -1)
        values, indices = logprobs.topk(k, dim=-1)
        return indices, values

    return teacher.config.vocab_size, top_k


def capture(
    teacher_dir: Path,
    data: Path,
    out: Path,
    *,
    k: int = 64,
    sequence_length: int = 512,
    shard_sequences: int = 64,
    encoding: str = "float16",
    compression: str = "zlib",
    engine_name: str = "transformers",
    tensor_parallel: int = 1,
    max_tokens: int | None = None,
    resume: bool = False,
    force: bool = False,
    console=None,
) -> dict:
    """Run the teacher once over DATA and store its top-k log-probabilities in OUT; returns the index.

    The teacher's tokenizer files are copied to OUT/tokenizer, so a student with another
    vocabulary can be mapped onto the store later (`open_store`).
    """
    from rich.progress import Progress
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qwenforge.checkpoint.folder import copy_tokenizer_files, read_config, refuse_overlap

    teacher_dir, out = Path(teacher_dir), Path(out)
    if encoding not in VALUE_ENCODINGS:
        raise QwenforgeError(f"--values {encoding}: choose one of {', '.join(VALUE_ENCODINGS)}")
    if compression not in COMPRESSIONS:
        raise QwenforgeError(f"--compression {compression}: choose one of {', '.join(COMPRESSIONS)}")
    if engine_name not in ENGINES:
        raise QwenforgeError(f"--engine {engine_name}: choose one of {', '.join(ENGINES)}")
    if sequence_length < 1:
        raise QwenforgeError(f"--sequence-length {sequence_length}: must be at least 1")
    read_config(teacher_dir)  # a missing teacher is one line here, not the hub's "Repo id" error
    refuse_overlap(out, {"teacher": teacher_dir})
    index_path = out / INDEX
    if out.exists() and not resume:
        if not force:
            raise QwenforgeError(f"{out}: already exists; pass --resume to continue a capture or --force to replace it")
        for item in out.glob("shard-*.safetensors"):
            item.unlink()
        index_path.unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    sequences = token_sequences(tokenizer, read_text(data), sequence_length, max_tokens, str(data))
    if engine_name == "vllm":
        from qwenforge.distill.vllm_engine import vllm_teacher

        vocab_size, top_k = vllm_teacher(teacher_dir, k, len(sequences[0]), tensor_parallel)
    else:
        vocab_size, top_k = _transformers_teacher(teacher_dir)
    if not 0 < k <= vocab_size:
        raise QwenforgeError(f"--k {k}: must be between 1 and the vocabulary size {vocab_size}")
    header = {
        "qwenforge_version": __version__,
        "teacher": str(teacher_dir),
        "engine": engine_name,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data": str(data),
        "vocab_size": vocab_size,
        "k": k,
        "values": encoding,
        "compression": compression,
        "sequence_length": len(sequences[0]) - 1,
        "sequences": len(sequences),
        "naive_bytes_per_token": bytes_per_token(k, vocab_size, encoding) + 4,
    }
    if resume and index_path.exists():
        index = read_json(index_path)
        index.setdefault("compression", "none")
        changed = [key for key in ("tokenizer_hash", "k", "values", "compression", "sequence_length", "sequences") if index.get(key) != header[key]]
        if changed:
            raise QwenforgeError(f"{out}: the existing capture differs in {', '.join(changed)}; capture to a new folder or pass --force")
    else:
        out.mkdir(parents=True, exist_ok=True)
        index = {**header, "shards": [], "complete": False}
        write_json(index_path, index)
    (out / "tokenizer").mkdir(exist_ok=True)
    copy_tokenizer_files(teacher_dir, out / "tokenizer")
    done = sum(shard["sequences"] for shard in index["shards"])
    with Progress(console=console, disable=console is None) as progress:
        task = progress.add_task("capture", total=len(sequences), completed=done)
        while done < len(sequences):
            chunk = sequences[done : done + shard_sequences]
            ids = torch.stack([s for s in chunk if len(s) == len(chunk[0])])
            top_indices, top_values = top_k(ids, k)
            tensors, metadata = encode_shard(ids, top_indices, top_values, vocab_size, encoding, compression)
            name = f"shard-{len(index['shards']):05d}.safetensors"
            temporary = out / f".{name}.tmp"
            save_file(tensors, str(temporary), metadata=metadata or None)
            os.replace(temporary, out / name)
            index["shards"].append({"file": name, "sequences": len(ids), "bytes": (out / name).stat().st_size})
            done += len(chunk)
            write_json(index_path, index)
            progress.update(task, completed=done)
    index["complete"] = True
    index["tokens"] = sum(shard["sequences"] for shard in index["shards"]) * index["sequence_length"]
    index["bytes_per_token"] = round(sum(shard["bytes"] for shard in index["shards"]) / max(index["tokens"], 1), 1)  # on disk
    write_json(index_path, index)
    return index
