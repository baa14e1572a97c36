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


STEPS = [
    ("know: import the embedded model", step_import),
    ("know: qwenforge spec", step_spec),
]


def run_demo(console: Console, workdir: Path | None = None, quick: bool = False) -> DemoState:
    from qwenforge.cache import cache_root

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
