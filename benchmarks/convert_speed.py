"""Conversion speed and memory against `cp` and mergekit, on synthetic Qwen2-shaped checkpoints or a real one.

    python benchmarks/convert_speed.py [--layers 6 14] [--mergekit /tmp/mergekit-venv/bin/mergekit-yaml]
    python benchmarks/convert_speed.py --source ~/.cache/qwenforge/models/Qwen2.5-Coder-0.5B-Instruct  # the embedded model

Builds each checkpoint (Qwen2.5-3B-like widths, bf16, untied head, several shards, random
values; the 6-layer one is 2.2 GB, 187 layers is 30 GB: more than this machine's page cache, so
the copies read the disk as a 72B conversion would) by streaming, then times in the same run, each in a fresh
child process whose peak RSS is read from getrusage(RUSAGE_CHILDREN):
  cp         copying the same files (the floor: no work at all);
  convert    `qwenforge convert --qk-norm ones --no-measure` (own tokenizer: copy, graft, padding rows
             reset, sha256 of every input file);
  again      the same conversion again: the inputs' sha256 are known from the first (provenance.py);
  transplant the same with the real Qwen3 tokenizer (vocabulary re-indexed to 151,936 rows);
  mergekit   `mergekit-yaml` passthrough of all layers (if installed in its own venv; never a
             qwenforge dependency: python3 -m venv /tmp/mergekit-venv &&
             /tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit).
Jobs run in rounds, each once per round; `paired` is the median over rounds of job / that
round's cp, which holds up better than the fastest-of ratio when the disk's speed drifts.
Targets: convert <= 1.3x cp; peak RSS <= 2x the largest tensor + the interpreter's baseline,
the same at both sizes; faster than mergekit. `--no-measure` skips the optional model loads
(smoke test, fidelity), which are not streaming by nature.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qwenforge.cache import cache_root
from qwenforge.checkpoint.safetensors_io import ShardedWriter
from qwenforge.fixtures.tokenizers import tokenizer_folder

WIDTHS = {"hidden": 2048, "heads": 16, "kv_heads": 2, "intermediate": 11008, "rows": 152_064}
MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - started
if code.returncode:
    sys.stderr.write(code.stderr[-2000:])
    sys.exit(code.returncode)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def entries(layers: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    h, i, rows = WIDTHS["hidden"], WIDTHS["intermediate"], WIDTHS["rows"]
    head_dim = h // WIDTHS["heads"]
    kv = WIDTHS["kv_heads"] * head_dim
    bf16 = torch.bfloat16
    out = [("model.embed_tokens.weight", (rows, h), bf16)]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,), bf16),
            (p + "self_attn.q_proj.weight", (h, h), bf16), (p + "self_attn.q_proj.bias", (h,), bf16),
            (p + "self_attn.k_proj.weight", (kv, h), bf16), (p + "self_attn.k_proj.bias", (kv,), bf16),
            (p + "self_attn.v_proj.weight", (kv, h), bf16), (p + "self_attn.v_proj.bias", (kv,), bf16),
            (p + "self_attn.o_proj.weight", (h, h), bf16),
            (p + "post_attention_layernorm.weight", (h,), bf16),
            (p + "mlp.gate_proj.weight", (i, h), bf16), (p + "mlp.up_proj.weight", (i, h), bf16),
            (p + "mlp.down_proj.weight", (h, i), bf16),
        ]
    out += [("model.norm.weight", (h,), bf16), ("lm_head.weight", (rows, h), bf16)]
    return out


def real_checkpoint(folder: Path) -> tuple[int, int, int]:
    """(bytes of its files, bytes of its largest tensor, layers) of a checkpoint folder, from the safetensors headers."""
    from qwenforge.checkpoint.mapped_reader import MappedReader

    reader = MappedReader(folder)
    largest = max(reader.span(name)[2] for name in reader.names())
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    return size, largest, json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def dtype_of(folder: Path) -> str:
    """The checkpoint's own dtype, so mergekit writes what convert writes (synthetic ones are bfloat16)."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("torch_dtype") or config.get("dtype") or "bfloat16"


def build_checkpoint(folder: Path, layers: int, tokenizer: Path) -> int:
    """Write a random Qwen2-shaped checkpoint tensor by tensor (never the whole model in memory)."""
    folder.mkdir(parents=True)
    plan = entries(layers)
    writer = ShardedWriter(folder, plan, max_shard_size="700MB")
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(1 << 22, generator=generator)  # random values, reused: building 30 GB stays quick
    for name, shape, dtype in plan:
        scale = 1.0 if "norm" in name else 0.02
        count = torch.Size(shape).numel()
        values = block.repeat(-(-count // block.numel()))[:count] if count > block.numel() else block[:count]
        writer.write(name, (values * scale).to(dtype).reshape(shape))
    writer.close()
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": WIDTHS["hidden"],
        "intermediate_size": WIDTHS["intermediate"], "num_hidden_layers": layers, "num_attention_heads": WIDTHS["heads"],
        "num_key_value_heads": WIDTHS["kv_heads"], "vocab_size": WIDTHS["rows"], "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for file in tokenizer.iterdir():
        shutil.copy2(file, folder / file.name)
    return writer.total_bytes


def settle(folder: Path | None = None) -> None:
    """Flush the previous job's dirty pages (else the next job pays for them) and evict the
    checkpoint's files from the page cache, so every job reads them from the disk as a 72B
    conversion does (the interpreter's own libraries stay cached, as on a working machine)."""
    os.sync()
    for file in (folder.iterdir() if folder else []):
        with open(file, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure(command: list[str], cold: Path | None = None, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of `command` run in a fresh child process, after `settle(cold)`."""
    settle(cold)
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr}")
    seconds, rss = result.stdout.split()
    return float(seconds), int(rss)


def rounds(repeats: int, jobs: dict[str, list[str]], out: Path, cold: Path, scratch: Path) -> dict[str, list[tuple[float, int]]]:
    """Every job once per round, in turn, `repeats` rounds: the disk's throughput drifts over
    minutes on this VM, so a job is compared with the cp of its own round, not of another minute.
    Each qwenforge job gets an empty cache folder, so it hashes its inputs, except `again`, which
    reuses the folder of the `convert` before it: a repeat conversion whose hashes are known."""
    runs: dict[str, list[tuple[float, int]]] = {job: [] for job in jobs}
    for round_number in range(repeats):
        for job, command in jobs.items():
            shutil.rmtree(out, ignore_errors=True)
            if job == "cp":
                out.mkdir()
            cache = scratch / f"cache-{cold.name}-{round_number}-{'convert' if job == 'again' else job}"
            runs[job].append(measure(command, cold, {"QWENFORGE_CACHE": str(cache)}))
    shutil.rmtree(out, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 14], help="model sizes (layers) to measure")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each job once per round); the fastest counts, and the median of each round's job/cp")
    parser.add_argument("--mergekit", default="/tmp/mergekit-venv/bin/mergekit-yaml", help="mergekit-yaml in its own venv")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--source", type=Path, default=None, help="a real checkpoint folder instead of the synthetic ones (e.g. the embedded Qwen2.5's import)")
    args = parser.parse_args()

    qwenforge = str(Path(sys.executable).with_name("qwenforge"))
    root = cache_root()
    source_tokenizer, qwen3_tokenizer = tokenizer_folder("qwen2.5", root), tokenizer_folder("qwen3", root)
    scratch = Path(tempfile.mkdtemp(prefix="convert-speed-", dir=args.workdir))
    have_mergekit = Path(args.mergekit).exists()
    # what convert imports without --measure or calibration (torch is not among it: checkpoint/dtypes.py)
    _, baseline = measure([sys.executable, "-c", "import numpy, tokenizers, qwenforge.cli, qwenforge.convert.run"])
    rows = []
    try:
        for layers in [None] if args.source else args.layers:
            if args.source:  # a real checkpoint, read in place
                source, (size, largest, layers) = args.source, real_checkpoint(args.source)
            else:
                source = scratch / f"qwen2-{layers}L"
                print(f"building a {layers}-layer checkpoint ...", flush=True)
                size = build_checkpoint(source, layers, source_tokenizer)
                largest = max(torch.Size(shape).numel() * 2 for _, shape, _ in entries(layers))
            out = scratch / "out"
            copy_files = [p for p in source.iterdir()]
            row = {"layers": layers, "bytes": size, "shards": len(list(source.glob("*.safetensors"))), "largest_tensor": largest}
            convert = [qwenforge, "convert", str(source), str(out), "--qk-norm", "ones", "--no-measure", "--force", "--max-shard-size", "700MB"]
            jobs = {"cp": ["cp", *map(str, copy_files), str(out)], "convert": convert, "again": convert, "transplant": [*convert, "--tokenizer", str(qwen3_tokenizer)]}
            if have_mergekit:
                config = scratch / "passthrough.yml"
                config.write_text(
                    f"slices:\n  - sources:\n      - model: {source}\n        layer_range: [0, {layers}]\n"
                    f"merge_method: passthrough\ndtype: {dtype_of(source)}\n"
                )
                jobs["mergekit"] = [args.mergekit, str(config), str(out), "--lazy-unpickle", "--quiet"]
            runs = rounds(args.repeats, jobs, out, source, scratch)
            row["runs"] = runs
            for job, measured in runs.items():  # fastest wall time, largest peak RSS
                row[job] = (min(m[0] for m in measured), max(m[1] for m in measured))
            shutil.rmtree(out, ignore_errors=True)
            if not args.source:
                shutil.rmtree(source)
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    gib = 2**30
    print("\nevery job starts after sync, with the source checkpoint evicted from the page cache (cold reads)")
    print(f"interpreter baseline RSS (python + numpy + qwenforge imports): {baseline / gib:.2f} GiB")
    for row in rows:
        limit = 2 * row["largest_tensor"] + baseline
        print(f"\n{row['layers']} layers: {row['bytes'] / 1e9:.2f} GB in {row['shards']} shards, largest tensor {row['largest_tensor'] / gib:.2f} GiB")
        print(f"  {'job':<11}{'wall s':>8}{'peak RSS GiB':>14}{'time / cp':>11}{'paired':>9}   each round's wall s")
        for job in ("cp", "convert", "again", "transplant", "mergekit"):
            if job in row:
                seconds, rss = row[job]
                paired = statistics.median(m[0] / c[0] for m, c in zip(row["runs"][job], row["runs"]["cp"]))
                each = " ".join(f"{m[0]:.2f}" for m in row["runs"][job])
                print(f"  {job:<11}{seconds:>8.2f}{rss / gib:>14.2f}{seconds / row['cp'][0]:>11.2f}{paired:>9.2f}   {each}")
        for job in ("convert", "transplant"):
            print(f"  {job}: peak RSS / (2 x largest tensor + baseline) = {row[job][1] / limit:.2f}")
        if "mergekit" in row:
            print(f"  mergekit / convert wall time = {row['mergekit'][0] / row['convert'][0]:.2f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"\nmodel {last['bytes'] / first['bytes']:.2f}x larger -> convert peak RSS "
            f"{last['convert'][1] / first['convert'][1]:.2f}x, transplant {last['transplant'][1] / first['transplant'][1]:.2f}x"
        )
        # seconds per extra GB between the two sizes: fixed costs (interpreter start, tokenizers) cancel out
        extra_gb = (last["bytes"] - first["bytes"]) / 1e9
        marginal = {job: (last[job][0] - first[job][0]) / extra_gb for job in ("cp", "convert", "again", "transplant", "mergekit") if job in last}
        print("marginal seconds per GB: " + ", ".join(f"{job} {value:.2f}" for job, value in marginal.items()))
        print(f"marginal convert / cp = {marginal['convert'] / marginal['cp']:.2f}", end="")
        if "mergekit" in marginal:
            print(f"; marginal mergekit / convert = {marginal['mergekit'] / marginal['convert']:.2f}", end="")
        print()


if __name__ == "__main__":
    main()
