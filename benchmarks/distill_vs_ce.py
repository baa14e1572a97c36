"""Distillation versus plain cross-entropy at the same token budget (the store's size: benchmarks/distill_store.py).

Teacher: the embedded Qwen2.5-Coder-0.5B-Instruct (24 layers). Student: the teacher with half its
layers (`distill init-student --keep-layers half`, 12 layers). Two arms train the same student
on the same text for the same steps and tokens: forward-KL distillation online (ce_weight 0)
and cross-entropy on the text (ce_weight 1, the baseline). Held-out bits per byte and KL to
the teacher on data/heldout.txt; each arm's curve goes to distill_vs_ce.json.

    python benchmarks/distill_vs_ce.py [--steps 40] [--batch-size 4] [--sequence-length 128] [--data FILE] [--threads 1]

Each step of the 0.5B teacher and its 12-layer student is ~1 TFLOP at the defaults (about a minute
on one CPU core); on this 2-core machine the real-model run used --steps 12 --batch-size 2
--sequence-length 64 --eval-every 4.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from qwenforge.cache import embedded_model
from qwenforge.distill.init_student import init_student
from qwenforge.distill.train import DistillOptions, train_online

DATA = Path(__file__).parents[1] / "src" / "qwenforge" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--data", default=str(DATA / "calibration.txt"))
    parser.add_argument("--heldout", default=str(DATA / "heldout.txt"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    teacher = embedded_model()
    scratch = tempfile.TemporaryDirectory(prefix="distill-vs-ce-")  # every model folder of the run (15 GB for heal_curve), removed at exit
    work = Path(scratch.name)
    init_student(teacher, work / "student", "half")
    results = {"teacher": str(teacher), "student_layers": "half", "data": args.data, "heldout": args.heldout, "threads": args.threads, "arms": {}}
    base = dict(steps=args.steps, eval_every=args.eval_every, patience=10_000, batch_size=args.batch_size, sequence_length=args.sequence_length, learning_rate=5e-5, threads=args.threads)
    for arm, ce_weight in (("cross_entropy", 1.0), ("distillation", 0.0)):
        started = time.perf_counter()
        report = train_online(teacher, work / "student", Path(args.data), Path(args.heldout), None, DistillOptions(**base, ce_weight=ce_weight), console=console)
        report["wall_seconds"] = time.perf_counter() - started
        results["arms"][arm] = report
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    ce, kd = results["arms"]["cross_entropy"], results["arms"]["distillation"]
    teacher_bpb = kd["before"]["teacher_bits_per_byte"]
    console.print(f"teacher bits/byte {teacher_bpb:.4f}; student before training {kd['before']['bits_per_byte']:.4f}, KL {kd['before']['kl']:.4f}")
    for name, arm in (("cross-entropy", ce), ("distillation", kd)):
        last = arm["history"][-1]
        console.print(f"{name:14s} tokens {arm['tokens_trained']:,}  best bits/byte {arm['best']['bits_per_byte']:.4f} KL {arm['best']['kl']:.4f}  "
                      f"final bits/byte {last['bits_per_byte']:.4f} KL {last['kl']:.4f}  {arm['wall_seconds']:.0f}s")
    console.print(f"ratio distillation / cross-entropy: bits/byte {kd['best']['bits_per_byte'] / ce['best']['bits_per_byte']:.3f}, KL {kd['best']['kl'] / ce['best']['kl']:.3f}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
