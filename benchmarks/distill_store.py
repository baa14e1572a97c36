"""Logit store size and fidelity: bytes per token at k = 32/64/128 for each layout, and reconstruction KL.

Teacher: the embedded Qwen2.5-Coder-0.5B-Instruct (151,936 rows: ids need more than 16 bits). Each store is
written by `capture.capture` (the real code path) over the held-out text, for every value encoding
(float16, uint8) and compression (none = the plain layout, zlib, lzma); bytes per token are the
shard files on disk (input ids included) divided by the stored positions. The baseline is the naive
layout measured in the same run: compression none, float16 values. Reconstruction KL is
KL(full teacher distribution || top-k + evenly spread tail rebuilt from the store), per position,
on the same text; capture and read times are wall seconds on this machine (report `uptime`).

    python benchmarks/distill_store.py [--data FILE] [--sequence-length 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qwenforge.cache import embedded_model
from qwenforge.distill import capture, store

DATA = Path(__file__).parents[1] / "src" / "qwenforge" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA / "heldout.txt"))
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    teacher = embedded_model()
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    work = Path(tempfile.mkdtemp(prefix="distill-store-"))
    full_logits: dict[tuple, torch.Tensor] = {}
    rows = []
    for k in (32, 64, 128):
        for encoding in store.VALUE_ENCODINGS:
            for compression in store.COMPRESSIONS:
                folder = work / f"{k}-{encoding}-{compression}"
                started = time.perf_counter()
                index = capture.capture(teacher, Path(args.data), folder, k=k, encoding=encoding, compression=compression, sequence_length=args.sequence_length)
                capture_seconds = time.perf_counter() - started
                started = time.perf_counter()
                shards = list(store.iterate_store(folder, store.open_store(folder)))
                read_seconds = time.perf_counter() - started
                kl_sum = positions = 0.0
                for ids, indices, logprobs in shards:
                    key = tuple(ids.flatten().tolist())
                    if key not in full_logits:
                        with torch.no_grad():
                            full_logits[key] = model(ids[:, :-1]).logits
                    kl_sum += float(store.reconstruction_kl(full_logits[key], indices, logprobs).sum())
                    positions += indices.shape[0] * indices.shape[1]
                disk = sum(os.path.getsize(folder / shard["file"]) for shard in index["shards"])
                rows.append({
                    "k": k, "values": encoding, "compression": compression, "tokens": index["tokens"],
                    "bytes_per_token": disk / index["tokens"], "reconstruction_kl": kl_sum / positions,
                    "capture_seconds": capture_seconds, "read_seconds": read_seconds,
                })
    shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        naive = next(r for r in rows if r["k"] == row["k"] and r["values"] == "float16" and r["compression"] == "none")
        row["ratio_to_naive"] = row["bytes_per_token"] / naive["bytes_per_token"]
    result = {"teacher": str(teacher), "data": args.data, "sequence_length": args.sequence_length, "threads": args.threads,
              "load": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"teacher {teacher} (vocab {index['vocab_size']:,}), {rows[0]['tokens']} positions of {args.data}; load {os.getloadavg()[0]:.2f}")
    print(f"{'k':>4} {'values':8} {'compression':11} {'B/token':>8} {'x naive':>8} {'recon KL':>9} {'capture s':>9} {'read s':>7}")
    for row in rows:
        print(f"{row['k']:4d} {row['values']:8} {row['compression']:11} {row['bytes_per_token']:8.1f} {row['ratio_to_naive']:8.3f} "
              f"{row['reconstruction_kl']:9.5f} {row['capture_seconds']:9.2f} {row['read_seconds']:7.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
