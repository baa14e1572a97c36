"""Claim: `qwenforge plan --tokens N --device cpu` predicts the wall time of LoRA SFT on this CPU.

Runs a short LoRA SFT (the trainer's own backend, sample curriculum, default zones) on the
embedded model, counts the real tokens trained and the train runtime, and prints the measured
tokens/s beside the planner's (plan_time.THROUGHPUT["cpu"] over plan_time's FLOPs per token),
and the effective FLOP/s this run implies, which is where the table's CPU figure comes from.

    python benchmarks/train_time.py --steps 4          # ~2-4 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=256)
    args = parser.parse_args()

    from qwenforge.arch.spec import spec_from_config
    from qwenforge.checkpoint.folder import read_config
    from qwenforge.plan_time import THROUGHPUT, training_flops_per_token
    from qwenforge.train.backends import create_backend
    from qwenforge.train.config import TrainConfig
    from qwenforge.train.curriculum import load_curriculum, sft_records
    from qwenforge.train.pipeline import zone_plan, resolve_model_folder, torch_threads

    folder = resolve_model_folder("embedded")
    config = TrainConfig(model=str(folder), output="unused")
    sft = dataclasses.replace(config.sft, max_steps=args.steps, batch_size=args.batch, max_seq_length=args.max_seq_length, save_steps=1000)
    records = [r for topic in load_curriculum("sample").topics for r in sft_records(topic)][: args.steps * args.batch]
    backend = create_backend("pytorch")
    backend.load(folder, zone_plan(config, folder))
    backend.start_adapter()
    logs = []
    with tempfile.TemporaryDirectory() as work, torch_threads(config) as threads:
        started = time.perf_counter()
        result = backend.sft(records, sft, Path(work), on_log=logs.append)
        wall = time.perf_counter() - started
    tokens = max(r.get("num_tokens", 0) for r in logs)
    runtime = result["train_runtime"]
    spec = spec_from_config(read_config(folder))
    sequence = tokens / (args.steps * args.batch)
    per_token = training_flops_per_token(spec, "lora", int(sequence), sft.gradient_checkpointing)
    measured = tokens / runtime
    predicted = THROUGHPUT["cpu"][0] / per_token
    print(f"{folder.name}: {args.steps} LoRA steps x batch {args.batch}, {tokens:.0f} tokens (mean row {sequence:.0f}) in {runtime:.1f} s "
          f"(wall {wall:.1f} s), {threads} thread(s), load {os.getloadavg()[0]:.1f}")
    print(f"measured {measured:.1f} tokens/s; planned {predicted:.1f} tokens/s; planned/measured {predicted / measured:.2f}")
    print(f"effective FLOP/s of this run: {measured * per_token:.3g} (plan_time.THROUGHPUT['cpu'] is {THROUGHPUT['cpu'][0]:.3g})")


if __name__ == "__main__":
    main()
