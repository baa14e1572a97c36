"""`qwenforge serve` under load: 8 concurrent openai clients x 200 requests, memory and latency.

    python benchmarks/serve_load.py                          # a tiny random Qwen3 (real tokenizer)
    python benchmarks/serve_load.py --model embedded --requests 20

Starts the server on 127.0.0.1, then measures, in one run:
- the server's resident memory (RSS) before and after the load: the ratio should stay near 1;
- request latency p50/p99 under load, and /health latency idle vs under load (its ratio);
- a body over the limit (20 MB against the 4 MiB default): HTTP 413, and /health's latency while it
  is refused, against idle. Stops by itself (--max-seconds) and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_seconds(base: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"{base}/health", timeout=120) as response:
        json.load(response)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_server(model: str, name: str):
    port = free_port()
    command = [sys.executable, "-m", "qwenforge.cli", "serve", model, "--port", str(port), "--served-name", name, "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()}")
        try:
            health_seconds(base)
            return process, base
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or 'embedded' (default: a tiny random Qwen3)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long")
    args = parser.parse_args()

    import openai

    model = args.model
    if model is None:
        from qwenforge.cache import cache_root
        from qwenforge.fixtures.tiny import build_tiny_checkpoint
        from qwenforge.fixtures.tokenizers import tokenizer_folder

        folder = Path(tempfile.mkdtemp()) / "tiny-qwen3"
        model = str(build_tiny_checkpoint("qwen3", folder, tokenizer_folder("qwen3", cache_root())))
    process, base = start_server(model, "load")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model="load", messages=[{"role": "user", "content": "warm up"}], max_tokens=2, temperature=0)
        idle_health = statistics.median(health_seconds(base) for _ in range(20))
        rss_before = rss_mib(process.pid)

        deadline = time.time() + args.max_seconds
        latencies: list[float] = []
        errors: list[str] = []

        def client_run(index: int) -> None:
            for number in range(args.requests):
                if time.time() > deadline:
                    return
                started = time.perf_counter()
                try:
                    client.chat.completions.create(
                        model="load", messages=[{"role": "user", "content": f"Client {index} asks question {number}: why is the sky blue?"}],
                        max_tokens=args.max_tokens, temperature=0.7, seed=number,
                    )
                    latencies.append(time.perf_counter() - started)
                except openai.OpenAIError as error:
                    errors.append(repr(error))

        loaded_health: list[float] = []
        stop = threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                loaded_health.append(health_seconds(base))
                time.sleep(0.2)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_run, range(args.clients)))
        wall = time.perf_counter() - started
        stop.set()
        poller.join()
        rss_after = rss_mib(process.pid)

        # one body over the limit, with /health polled while it is sent and refused
        big = json.dumps({"model": "load", "messages": [{"role": "user", "content": "word " * 4_000_000}]}).encode()
        status = {}

        def send_big() -> None:
            request = urllib.request.Request(f"{base}/v1/chat/completions", data=big, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    status["code"] = response.status
            except urllib.error.HTTPError as error:
                status["code"] = error.code
            except OSError as error:  # the server may close the connection before the whole body is sent
                status["code"] = f"closed ({type(error).__name__})"

        sender = threading.Thread(target=send_big)
        sender.start()
        big_health = []
        while sender.is_alive():
            big_health.append(health_seconds(base))
            time.sleep(0.05)
        sender.join()
        rss_big = rss_mib(process.pid)

        done = len(latencies)
        print(f"requests: {done} of {args.clients * args.requests} answered, {len(errors)} errors, {wall:.1f} s, {done / wall:.1f} requests/s")
        if errors:
            print(f"first error: {errors[0]}")
        print(f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} ms (one generation at a time, {args.clients} clients queued)")
        print(f"server RSS before {rss_before:.0f} MiB, after {rss_after:.0f} MiB: ratio {rss_after / rss_before:.3f}")
        print(f"/health idle {idle_health * 1000:.1f} ms, under load median {statistics.median(loaded_health) * 1000:.1f} ms, max {max(loaded_health) * 1000:.1f} ms: median ratio {statistics.median(loaded_health) / idle_health:.2f}")
        print(f"{len(big) / 1e6:.0f} MB body: HTTP {status.get('code')}; /health max {max(big_health, default=0) * 1000:.1f} ms while it was refused; RSS after {rss_big:.0f} MiB (ratio to before {rss_big / rss_before:.3f})")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    main()
