"""GGUF export time and peak memory: `qwenforge export` against llama.cpp's own convert_hf_to_gguf.py.

    /work/main/.venv/bin/python benchmarks/export_speed.py [--model FOLDER] [--type f16] [--llama-cpp DIR]

Both run on the same checkpoint folder (default: the embedded Qwen2.5-Coder-0.5B-Instruct, float32)
to the same output type, each in a fresh child process whose wall time and peak RSS come from
wait4(). The converter ships in llama-cpp-python's source distribution (vendor/llama.cpp/); without
--llama-cpp it is fetched once with `pip download --no-deps --no-binary :all: llama-cpp-python` and
unpacked (never built), and runs in this interpreter with its own gguf-py first on PYTHONPATH (it
needs nothing else here). Then the two files are compared tensor by tensor (names, types, bytes).
Prints each figure and the ratios qwenforge / llama.cpp (below 1: qwenforge is faster or smaller).

Measured here (2 shared CPU cores, load ~10; llama.cpp from llama-cpp-python 0.3.36's sdist), the
embedded model (float32, 2.52 GB) to f16: qwenforge 100.5 s, peak RSS 1000 MiB; convert_hf_to_gguf.py
134.5 s, 1149 MiB; ratio time 0.75x, peak RSS 0.87x; 291/291 tensors byte-identical to llama.cpp's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def llama_cpp_source(cache: Path) -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist, downloaded and unpacked once."""
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache), "llama-cpp-python"], check=True)
    with tarfile.open(sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]) as archive:
        archive.extractall(cache, filter="data")
    return sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def timed(command: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[:3]} failed:\n{child.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def compare(ours: Path, theirs: Path) -> str:
    import gguf
    import numpy as np

    left = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    right = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = [name for name in left if name in right and left[name].tensor_type == right[name].tensor_type
            and np.array_equal(np.asarray(left[name].data), np.asarray(right[name].data))]
    only = sorted(set(left) ^ set(right))
    return f"{len(same)}/{len(right)} tensors byte-identical to llama.cpp's; names in one file only: {only or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="a type both tools write")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source folder holding convert_hf_to_gguf.py")
    args = parser.parse_args()
    from qwenforge.cache import cache_root, embedded_model

    model = args.model or embedded_model()
    source = args.llama_cpp or llama_cpp_source(cache_root() / "llama-cpp-python-sdist")
    with tempfile.TemporaryDirectory(dir=cache_root()) as work:
        ours, theirs = Path(work) / "qwenforge.gguf", Path(work) / "llama-cpp.gguf"
        ours_s, ours_rss = timed([sys.executable, "-m", "qwenforge.cli", "export", str(model), str(ours), "--type", args.type])
        theirs_s, theirs_rss = timed(
            [sys.executable, str(source / "convert_hf_to_gguf.py"), str(model), "--outfile", str(theirs), "--outtype", args.type],
            env={"PYTHONPATH": str(source / "gguf-py")},
        )
        print(f"model {model} ({sum(f.stat().st_size for f in Path(model).glob('*.safetensors')) / 1e9:.2f} GB of safetensors), --type {args.type}")
        print(f"qwenforge export      {ours_s:7.1f} s  peak RSS {ours_rss / 2**20:7.0f} MiB  file {ours.stat().st_size / 2**20:7.0f} MiB")
        print(f"convert_hf_to_gguf.py {theirs_s:7.1f} s  peak RSS {theirs_rss / 2**20:7.0f} MiB  file {theirs.stat().st_size / 2**20:7.0f} MiB")
        print(f"ratio qwenforge / llama.cpp: time {ours_s / theirs_s:.2f}x, peak RSS {ours_rss / theirs_rss:.2f}x")
        print(compare(ours, theirs))


if __name__ == "__main__":
    main()
