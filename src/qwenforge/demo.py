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
    model: Path | None = None
    results: dict = field(default_factory=dict)


def step_import(state: DemoState) -> None:
    """Import the bundled GGUF (once; cached) into a Hugging Face checkpoint folder."""
    from qwenforge.cache import embedded_model

    with state.console.status("Importing the embedded SmolLM2-135M-Instruct GGUF (first run only) ..."):
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

    here = plan_report(str(state.model), memory_gb=4, kind="cpu", mode="lora", weights="fp32", context=512, lora_rank=8)
    print_plan(state.console, here)
    mac = plan_report("Qwen2.5-72B-Instruct", fit="M2-Ultra-64GB", context=4096)
    print_plan(state.console, mac | {"fit": mac["fit"][:5]})
    qlora = plan_report("Qwen2.5-72B-Instruct", device="M2-Ultra-64GB", mode="qlora", context=4096)
    state.console.print(
        f"Qwen2.5-72B-Instruct QLoRA (nf4, LoRA r16 all-linear, 4K): {qlora['total_gib']:.1f} GiB of {qlora['usable_bytes'] / 2**30:.0f} usable "
        f"-> {'fits' if qlora['fits'] else 'does not fit'}; largest context that fits: {qlora['largest_context']:,} (docs/plan.md explains)"
    )
    state.results["plan"] = {"embedded_lora_gib": here["total_gib"], "qwen72b_qlora_gib": qlora["total_gib"], "qwen72b_qlora_fits": qlora["fits"]}


def step_convert(state: DemoState) -> None:
    """Rebuild the model in the Qwen3 architecture (q/k-norm calibrated on text) and measure what it cost."""
    from qwenforge.compare import summary_line
    from qwenforge.convert import convert

    out = state.workdir / "converted-qwen3"
    tokens = 128 if state.quick else 512
    with state.console.status("Converting to Qwen3 (calibrating q/k-norm, smoke test, fidelity) ..."):
        result = convert(state.model, out, qk_norm="calibrated", force=True, fidelity_tokens=tokens, calibration_tokens=2 * tokens)
    record = result["metadata"]
    state.console.print(f"wrote {out}: {len(record['tensors'])} tensors, q/k-norm calibrated on {2 * tokens} tokens")
    state.console.print(f"smoke test: {record['smoke_test']['prompt']!r} -> {record['smoke_test']['reply']!r}")
    state.console.print(f"fidelity vs source ({record['fidelity']['text']}, {tokens} tokens): {summary_line(record['fidelity'])}")
    state.results["converted"] = out
    state.results["convert_fidelity"] = record["fidelity"]


def step_heal(state: DemoState) -> None:
    """Give back what the conversion cost: closed-form heal (and, without --quick, a short gradient heal to compare)."""
    from qwenforge.heal import HealOptions, heal

    converted = state.results.get("converted")
    if converted is None:
        state.console.print("no converted model (the convert step did not run); skipping heal")
        return
    tokens = 256 if state.quick else 768
    runs = [("linearize", HealOptions(method="linearize", eval_tokens=tokens))]
    if not state.quick:
        runs.append(("norms, layer-wise, 40 s", HealOptions(train="norms", method="layerwise", steps=200, budget_minutes=40 / 60, eval_every=10, eval_tokens=tokens)))
    for label, options in runs:
        with state.console.status(f"Healing ({label}) against the source on held-out text ..."):
            report = heal(converted, state.workdir / f"healed-{options.method}", state.model, options, force=True)
        before, after = report["before"], report["after"]
        state.console.print(
            f"{label}: held-out top-1 agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}, "
            f"bits/byte {before['bits_per_byte']:.3f} -> {after['bits_per_byte']:.3f} (source {after['teacher_bits_per_byte']:.3f}), "
            f"{report['seconds_total']:.0f}s"
        )
        state.results.setdefault("heal", {})[label] = {"before": before, "after": after}


def step_train(state: DemoState) -> None:
    """A few zone-LoRA SFT steps on one topic of the sample curriculum: the answer loss goes down."""
    from qwenforge.train.pipeline import sft_trial

    steps, examples = (2, 2) if state.quick else (6, 8)
    with state.console.status(f"SFT: {steps} steps on {examples} examples of the sample topic 'tokens' ..."):
        trial = sft_trial(state.model, state.workdir / "train", steps=steps, examples=examples, max_seq_length=128 if state.quick else 256)
    state.console.print(
        f"zones: {trial['adapted_layers']} layers adapted, {trial['trainable_parameters']:,} trainable parameters; "
        f"answer loss {trial['loss_before']:.3f} -> {trial['loss_after']:.3f} after {trial['steps']} steps ({trial['seconds']:.0f}s)"
    )
    state.results["train"] = trial


def step_chat(state: DemoState) -> None:
    """Ask the embedded model a question through qwenforge's generation path (the one chat/serve use)."""
    from qwenforge.infer.generation import Sampling, build_prompt, complete
    from qwenforge.infer.load import load_model

    loaded = load_model(str(state.model), say=lambda line: state.console.print(f"[dim]{line}[/dim]", highlight=False))
    question = "What is the capital of France?"
    prompt = build_prompt(loaded.tokenizer, [{"role": "user", "content": question}])
    result = complete(loaded, prompt, Sampling(temperature=0, max_new_tokens=32))
    state.console.print(f"[bold]user:[/bold] {question}\n[bold]model:[/bold] {result.text.strip()}", highlight=False)
    state.console.print(f"{result.completion_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, first token {result.first_token_seconds:.2f}s")
    state.results["chat_answer"] = result.text.strip()
    state.results["chat_tokens_per_second"] = round(result.tokens_per_second, 1)


STEPS = [
    ("know: import the embedded model", step_import),
    ("know: qwenforge spec", step_spec),
    ("know: qwenforge plan", step_plan),
    ("convert: qwenforge convert (embedded -> Qwen3)", step_convert),
    ("convert: qwenforge heal (before/after on held-out text)", step_heal),
    ("teach: qwenforge train (a few SFT steps)", step_train),
    ("run: qwenforge chat (one question, greedy)", step_chat),
]


def run_demo(console: Console, workdir: Path | None = None, quick: bool = False) -> DemoState:
    import warnings

    from transformers.utils import logging as transformers_logging

    from qwenforge.cache import cache_root

    # The demo prints its own summary per step; library progress bars and deprecation notices only bury it.
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    workdir = Path(workdir) if workdir else cache_root() / "demo" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    state = DemoState(console=console, workdir=workdir, quick=quick)
    for title, step in STEPS:
        console.print(Rule(title))
        started = time.perf_counter()
        step(state)
        console.print(f"[dim]{title}: {time.perf_counter() - started:.1f}s[/dim]")
    console.print(Rule("done"))
    console.print(f"outputs in {workdir}")
    return state
