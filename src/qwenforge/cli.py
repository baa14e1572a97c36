"""The `qwenforge` command: one verb per stage; each parses its flags, calls the library, prints.

User errors (`QwenforgeError`) print one line and exit 2; `--debug` keeps the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from qwenforge import __version__
from qwenforge.errors import QwenforgeError

app = typer.Typer(
    name="qwenforge",
    help="Know, convert, heal, teach and run dense Qwen-family checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def print_json(data) -> None:
    """Machine output: one JSON object on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        console.print(f"qwenforge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Know, convert, heal, teach and run dense Qwen-family checkpoints (Qwen2, Qwen2.5, QwQ, Qwen3; Llama-shaped accepted)."""


@app.command()
def spec(
    model: Optional[str] = typer.Argument(
        None, help="Preset name, checkpoint folder, config.json, GGUF file, or 'embedded' (the bundled SmolLM2-135M)."
    ),
    list_presets: bool = typer.Option(False, "--list", help="List the built-in presets."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Exact architecture facts and parameter counts of a model, computed from its config.

    Example: [bold]qwenforge spec Qwen2.5-72B-Instruct[/bold]
    """
    from qwenforge.arch import report

    if list_presets:
        rows = report.preset_rows()
        print_json(rows) if as_json else console.print(report.preset_table(rows))
        return
    if model is None:
        raise QwenforgeError("spec needs a MODEL (preset, folder, config.json or .gguf); `qwenforge spec --list` shows presets")
    facts = report.spec_report(model)
    print_json(facts) if as_json else report.print_spec(console, facts)


@app.command("import-gguf")
def import_gguf_command(
    gguf_file: Path = typer.Argument(..., help="A GGUF file of a llama, qwen2 or qwen3 model."),
    out: Path = typer.Argument(..., help="Checkpoint folder to create."),
    dtype: str = typer.Option("float32", help="Weight dtype of the output: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Import a GGUF file as a Hugging Face checkpoint folder (weights dequantized, tokenizer and chat template kept)."""
    from qwenforge.checkpoint.gguf_import import import_gguf

    if dtype not in ("float32", "bfloat16", "float16"):
        raise QwenforgeError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    with console.status(f"Importing {gguf_file.name} ..."):
        import_gguf(gguf_file, out, dtype=dtype, force=force)
    console.print(f"[green]wrote[/green] {out}")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Folder for the demo's outputs (default: a fresh one in the cache)."),
    quick: bool = typer.Option(False, "--quick", help="Shorter runs of the long steps (used by the tests)."),
) -> None:
    """The whole pipeline on the embedded real model (SmolLM2-135M-Instruct), end to end."""
    from qwenforge.demo import run_demo

    run_demo(console, workdir=workdir, quick=quick)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    debug = "--debug" in sys.argv
    try:
        app()
    except QwenforgeError as error:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
