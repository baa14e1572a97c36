"""Fidelity of the healed Qwen2.5 -> Qwen3 conversion against healing time, per heal method.

Converts the embedded Qwen2.5-Coder-0.5B-Instruct with calibrated q/k norms (`qwenforge convert`,
q/k/v biases kept), then heals it with each arm: the closed forms (`--method anchor`, the default,
and `--method linearize`) and gradient healing (`METHOD:TRAIN`, e.g. `layerwise+global:norms`,
equal time budgets; `drop-bias/METHOD:TRAIN` heals the conversion without q/k/v biases, the model
card's choice); heals on data/calibration.txt, evaluates on data/heldout.txt. Prints each
arm's held-out top-1 agreement and bits-per-byte ratio against the source (the baseline, measured
in the same run) and writes every curve to heal_curve.json, with the load average around each arm.
The linearize output is also measured loaded in bfloat16 (as users load it) against the float32
source, next to the source's own bfloat16 copy (the floor bf16 allows); per-format figures of the
default are benchmarks/heal_formats.py's.

    python benchmarks/heal_curve.py [--minutes 5] [--threads 1] [--out benchmarks/heal_curve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from qwenforge import compare
from qwenforge.cache import embedded_model
from qwenforge.convert.run import convert
from qwenforge.files import default_text
from qwenforge.heal import HealOptions, heal


def bfloat16_check(source: Path, healed: Path, tokens: int = 1024) -> dict:
    """Held-out top-1 agreement, KL and bits-per-byte ratio against the float32 source, of bf16 copies."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def bf16(folder: Path):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(folder)

    text, reference = default_text("heldout.txt").read_text(), compare.load(source)
    figures = {}
    for name, candidate in (("source_bf16", bf16(source)), ("healed_bf16", bf16(healed)), ("healed_fp32", compare.load(healed))):
        result = compare.fidelity(reference, candidate, text, max_tokens=tokens)
        figures[name] = {key: result[key] for key in ("top1_agreement", "kl", "bits_per_byte_ratio")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=5.0, help="healing budget per --train choice")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="anchor,linearize,layerwise+global:norms,layerwise+global:norms+qk-lora")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    source = embedded_model()
    scratch = tempfile.TemporaryDirectory(prefix="heal-curve-")  # every model folder of the run (15 GB for heal_curve), removed at exit
    work = Path(scratch.name)
    started = time.perf_counter()
    convert(source, work / "converted", measure=False)
    results = {"source": str(source), "threads": args.threads, "minutes_per_arm": args.minutes, "conversion_seconds": time.perf_counter() - started, "arms": {}}
    for arm in args.arms.split(","):
        converted = work / "converted"
        if arm.startswith("drop-bias/"):  # the model card's choice: q/k/v biases dropped, healed by gradient
            converted = work / "converted-drop-bias"
            if not converted.exists():
                convert(source, converted, measure=False, keep_bias=False)
        method, _, train = arm.removeprefix("drop-bias/").partition(":")
        options = HealOptions(train=train or "norms", method=method, steps=1000, budget_minutes=args.minutes, eval_every=10, patience=6, threads=args.threads, formats=None)
        arm_started, load_before = time.perf_counter(), os.getloadavg()
        healed = work / f"healed-{arm.replace('+', '-').replace(':', '-').replace('/', '-')}"
        report = heal(converted, healed, source, options, console=console)
        report["wall_seconds"] = time.perf_counter() - arm_started
        report["load_average_before_after"] = [load_before, os.getloadavg()]
        if arm == "linearize":
            report["bfloat16"] = bfloat16_check(source, healed)
            console.print(f"linearize loaded in bfloat16 vs the float32 source: {report['bfloat16']}")
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
