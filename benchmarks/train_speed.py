"""Claim: qwenforge's SFT is at least as fast as a plain TRL SFTTrainer with the same model, data and
LoRA layout, and at least 1.3x where packing applies; peak memory is reported beside it.

qwenforge's SFT (`PyTorchBackend.sft`) with `sft.packing: true` packs the short chat examples into
`max_seq_length` rows without padding (TRL's best-fit-decreasing packing, padding-free); the baseline is TRL's SFTTrainer
with its defaults (padded batches), given the same PEFT model (the same zone LoraConfig), the same
examples, batch size, learning rate and one epoch. Each variant runs in its own process, so peak
memory (max RSS) is its own; tokens/s counts the real (non-padding) tokens of the examples.

    python benchmarks/train_speed.py                     # embedded SmolLM2-135M, 16 examples
    python benchmarks/train_speed.py --examples 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
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
    from qwenforge.train.curriculum import load_curriculum, sft_records
    from qwenforge.train.pipeline import build_plan, resolve_model_folder

    config = TrainConfig(model=args.model, output="unused")
    settings = dataclasses.replace(
        config.sft, batch_size=args.batch_size, max_seq_length=args.max_seq_length, epochs=1.0, packing=(variant == "qwenforge")
    )
    topics = load_curriculum("sample").topics
    records = [r for t in topics for r in sft_records(t)][: args.examples]
    folder = resolve_model_folder(args.model)
    backend = PyTorchBackend()
    backend.load(folder, build_plan(config, folder))
    backend.start_adapter()
    tokenizer = backend.tokenizer
    tokens = sum(
        min(args.max_seq_length, len(tokenizer(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False), add_special_tokens=False)["input_ids"]))
        for r in records
    )
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as work:
        if variant == "qwenforge":
            result = backend.sft(records, settings, Path(work))
        else:
            result = plain_trl(backend, records, settings, Path(work))
    return {
        "variant": variant,
        "tokens": tokens,
        "seconds": result["train_runtime"],
        "steps": result["steps"],
        "tokens_per_second": tokens / result["train_runtime"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "training_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_loaded) / 1024,
    }


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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("qwenforge", "trl"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = {}
    for variant in ("trl", "qwenforge"):
        started = time.perf_counter()
        command = [sys.executable, __file__, "--worker", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker" and v is not None
        ]
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
    print(f"speed ratio qwenforge / plain TRL: {ratio:.2f}x (claim: >= 1.3x with packing); peak memory ratio {memory:.2f}")
    print(json.dumps({"ratio": ratio, "memory_ratio": memory, "rows": rows}))


if __name__ == "__main__":
    main()
