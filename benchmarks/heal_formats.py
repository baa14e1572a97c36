"""Each heal method's checkpoint against the source, both put in the same format, on held-out text.

    PYTHONPATH=src python benchmarks/heal_formats.py [--source FOLDER] [--converted FOLDER] [--tokens 512] [--lora-steps 50]

The converted model is `qwenforge convert SOURCE OUT` (q/k/v biases kept, calibrated q/k-norm: the
default); each method is applied to it in memory (anchor, linearize) and measured with
compare.format_fidelity (formats.py: bf16/fp16 emulated; GGUF types per tensor as `export --type`
gives them, Q4_K_M's K-quants by llama.cpp's own quantizer from the xllamacpp extra). The fine-tune arm is compare.lora_trainability
(same seed, data and rate for every model). Prints a table per method and writes heal_formats.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qwenforge import compare
from qwenforge.files import default_text
from qwenforge.heal import anchor_qk_norms, linearize_qk_norms

FORMATS = ["fp32", "bf16", "fp16", "q8_0", "q4_k_m"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/tmp/qfcache/models/Qwen2.5-Coder-0.5B-Instruct")
    parser.add_argument("--converted", required=True, help="`qwenforge convert SOURCE OUT --accept-lossy` output (default options)")
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens")
    parser.add_argument("--lora-steps", type=int, default=50, help="0 skips the fine-tune arm")
    parser.add_argument("--methods", default="calibrated,linearize,anchor")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    torch.manual_seed(0)
    source = compare.load(args.source)
    converted = compare.load(args.converted)
    heldout = default_text("heldout.txt").read_text()
    calibration = default_text("calibration.txt").read_text()
    ids = torch.tensor(converted[1](calibration, add_special_tokens=False).input_ids[:2048])
    cache: dict = {}
    results = {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        model = copy.deepcopy(converted[0])
        facts = {"calibrated": lambda m: {}, "linearize": linearize_qk_norms, "anchor": lambda m: anchor_qk_norms(m, ids)}[method](model)
        seconds = time.perf_counter() - started
        pair = (model, converted[1])
        row = {"heal_seconds": seconds, "facts": facts, "formats": compare.format_fidelity(source, pair, heldout, FORMATS, max_tokens=args.tokens, cache=cache)}
        if args.lora_steps and method != "calibrated":
            row["formats"]["lora"] = compare.lora_trainability(source, pair, calibration, compare.text_prefix(source[1], heldout, args.tokens), steps=args.lora_steps)
        results[method] = row
        print(f"\n{method} (heal {seconds:.0f} s)\n" + compare.formats_table(row["formats"]), flush=True)
        Path(args.out).write_text(json.dumps({"source": args.source, "tokens": args.tokens, "lora_steps": args.lora_steps, "results": results}, indent=1, default=str))
        del model


if __name__ == "__main__":
    main()
