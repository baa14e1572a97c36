"""Fidelity of the healed SmolLM2 -> Qwen3 conversion against healing time, per --train choice.

Converts the embedded SmolLM2-135M-Instruct with calibrated q/k norms (`qwenforge convert`),
then heals it with each `--train` choice (layer-wise then global, equal time budgets) and with
the closed-form `--method linearize`; heals on data/calibration.txt, evaluates on
data/heldout.txt. Prints each arm's held-out top-1 agreement and bits-per-byte ratio against the
source (the baseline, measured in the same run) and writes every curve to heal_curve.json.

    python benchmarks/heal_curve.py [--minutes 5] [--threads 1] [--out benchmarks/heal_curve.json]
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
from qwenforge.convert.run import convert
from qwenforge.heal import HealOptions, heal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=5.0, help="healing budget per --train choice")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="linearize,norms,norms+qk-lora,attention")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    source = embedded_model()
    work = Path(tempfile.mkdtemp(prefix="heal-curve-"))
    started = time.perf_counter()
    convert(source, work / "converted", measure=False)
    results = {"source": str(source), "threads": args.threads, "minutes_per_arm": args.minutes, "conversion_seconds": time.perf_counter() - started, "arms": {}}
    for arm in args.arms.split(","):
        method = "linearize" if arm == "linearize" else "layerwise+global"
        options = HealOptions(train="norms" if arm == "linearize" else arm, method=method, steps=1000, budget_minutes=args.minutes, eval_every=10, patience=6, threads=args.threads)
        arm_started = time.perf_counter()
        report = heal(work / "converted", work / f"healed-{arm.replace('+', '-')}", source, options, console=console)
        report["wall_seconds"] = time.perf_counter() - arm_started
        results["arms"][arm] = report
        after, before = report["after"], report["before"]
        console.print(
            f"{arm:14s} trainable {report['trainable_parameters']:>9,d}  {report['wall_seconds']:6.0f}s  "
            f"top-1 {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}  "
            f"bits/byte ratio to source {before['bits_per_byte'] / before['teacher_bits_per_byte']:.3f} -> "
            f"{after['bits_per_byte'] / after['teacher_bits_per_byte']:.3f}  KL {before['kl']:.4f} -> {after['kl']:.4f}"
        )
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
