"""Claim: qwenforge's SFT is at least as fast as a plain TRL SFTTrainer with the same model, data and
LoRA layout, and at least 1.3x where packing applies; peak memory is reported beside it.

qwenforge's SFT (`PyTorchBackend.sft`) with `sft.packing: true` packs the short chat examples into
`max_seq_length` rows without padding (TRL's best-fit-decreasing packing, padding-free); the baseline is TRL's SFTTrainer
with its defaults (padded batches), given the same PEFT model (the same zone LoraConfig), the same
examples, batch size, learning rate and one epoch. Each variant runs in its own process, so peak
memory (max RSS) is its own; tokens/s counts the real (non-padding) tokens of the examples.

TRL pads each batch to its longest example (not to max_length), so what packing saves depends on
how much the lengths differ; the padding share of the baseline's batches is printed beside the
ratio. The sample curriculum's answers are all about the same length (little padding); `--spread`
cuts the answers to lengths spread from 15% to 100% (the same records for both variants), the case
packing is for. On CPU qwenforge packs into one row of max_length per micro-step (see
PyTorchBackend.sft), which also keeps each step's working set small.

    python benchmarks/train_speed.py                     # embedded Qwen2.5-Coder-0.5B-Instruct, 16 examples
    python benchmarks/train_speed.py --examples 32 --spread
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def worker(variant: str, args) -> dict:
    import dataclasses
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from qwenforge.train.backends.pytorch import PyTorchBackend
    from qwenforge.train.config import TrainConfig
    from qwenforge.train.pipeline import zone_plan, resolve_model_folder

    config = TrainConfig(model=args.model, output="unused")
    settings = dataclasses.replace(
        config.sft, batch_size=args.batch_size, max_seq_length=args.max_seq_length, epochs=1.0, packing=(variant == "qwenforge")
    )
    records = benchmark_records(args)
    folder = resolve_model_folder(args.model)
    backend = PyTorchBackend()
    backend.load(folder, zone_plan(config, folder))
    backend.start_adapter()
    tokenizer = backend.tokenizer
    lengths = [
        min(args.max_seq_length, len(tokenizer(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False), add_special_tokens=False)["input_ids"]))
        for r in records
    ]
    tokens = sum(lengths)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as work:
        if variant == "qwenforge":
            result = backend.sft(records, settings, Path(work))
        else:
            result = plain_trl(backend, records, settings, Path(work))
    return {
        "variant": variant,
        "tokens": tokens,
        "padding_share": padding_share(lengths, args.batch_size),
        "seconds": result["train_runtime"],
        "steps": result["steps"],
        "tokens_per_second": tokens / result["train_runtime"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_loaded) / 1024,
    }


def benchmark_records(args) -> list[dict]:
    """The sample curriculum's SFT records; with --spread, answers cut to 15%..100% of their words."""
    from qwenforge.train.curriculum import load_curriculum, sft_records

    records = [r for t in load_curriculum("sample").topics for r in sft_records(t)][: args.examples]
    if not args.spread:
        return records
    cut = []
    for index, record in enumerate(records):
        words = record["completion"][0]["content"].split()
        keep = max(3, round(len(words) * (0.15 + 0.85 * index / max(1, len(records) - 1))))
        cut.append({**record, "completion": [{**record["completion"][0], "content": " ".join(words[:keep])}]})
    return cut


def padding_share(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of padding in batches padded to their longest example (TRL's default), shuffled as the trainer does."""
    import random

    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = sum(
        max(lengths[i] for i in order[k:k + batch_size]) * len(order[k:k + batch_size]) for k in range(0, len(order), batch_size)
    )
    return 1 - sum(lengths) / padded


def plain_trl(backend, records, settings, work: Path) -> dict:
    """The baseline: TRL's SFTTrainer as its docs show it, on the same PEFT model."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work),
        learning_rate=settings.learning_rate,
        num_train_epochs=1,
        per_device_train_batch_size=settings.batch_size,
        max_length=settings.max_seq_length,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=not torch.cuda.is_available(),  # TRL's default bf16 needs a GPU; the same device as qwenforge's
    )
    trainer = SFTTrainer(model=backend.model, args=args, train_dataset=Dataset.from_list(records), processing_class=backend.tokenizer)
    output = trainer.train()
    return {**output.metrics, "steps": trainer.state.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per variant (1: steady on a shared CPU)")
    parser.add_argument("--spread", action="store_true", help="answers cut to a spread of lengths (where packing applies)")
    parser.add_argument("--worker", choices=("qwenforge", "trl"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = {}
    for variant in ("trl", "qwenforge"):
        started = time.perf_counter()
        command = [sys.executable, __file__, "--worker", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "spread") and v is not None
        ] + (["--spread"] if args.spread else [])
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[variant]["wall_seconds"] = round(time.perf_counter() - started, 1)
    for row in rows.values():
        print(
            f"{row['variant']:>10}: {row['tokens']} tokens in {row['seconds']:.1f}s ({row['steps']} steps) = "
            f"{row['tokens_per_second']:.1f} tokens/s; peak RSS {row['peak_rss_mb']:.0f} MB (+{row['training_rss_mb']:.0f} MB while training)"
        )
    ratio = rows["qwenforge"]["tokens_per_second"] / rows["trl"]["tokens_per_second"]
    memory = rows["qwenforge"]["peak_rss_mb"] / rows["trl"]["peak_rss_mb"]
    print(f"padding in plain TRL's batches: {rows['trl']['padding_share']:.0%} of the positions it computes")
    print(f"speed ratio qwenforge / plain TRL: {ratio:.2f}x (claim: >= 1.3x with packing); peak memory ratio {memory:.2f}")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average {load} on {os.cpu_count()} cores")
    print(json.dumps({"ratio": ratio, "memory_ratio": memory, "load": load, "rows": rows}))


if __name__ == "__main__":
    main()
