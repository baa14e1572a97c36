"""The `qwenforge` command: one verb per stage; each parses its flags, calls the library, prints.

User errors (`QwenforgeError`) print one line and exit 2; `--debug` keeps the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

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
) -> None:
    """Know, convert, heal, teach and run dense Qwen-family checkpoints (Qwen2, Qwen2.5, QwQ, Qwen3; Llama-shaped accepted).

    --debug anywhere on the command line keeps the full traceback of an error.
    """


_REVISION_HELP = "Branch, tag or commit of a Hugging Face MODEL id (default: main)."


@app.command()
def spec(
    model: Optional[str] = typer.Argument(
        None, help="Preset name, checkpoint folder, config.json, GGUF file, Hugging Face id (config.json only), or 'embedded' (the bundled Qwen2.5-Coder-0.5B-Instruct)."
    ),
    list_presets: bool = typer.Option(False, "--list", help="List the built-in presets."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    revision: Optional[str] = typer.Option(None, help=_REVISION_HELP),
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
    facts = report.spec_report(model, revision=revision)
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

    with console.status(f"Importing {gguf_file.name} ..."):
        import_gguf(gguf_file, out, dtype=dtype, force=force)
    console.print(f"[green]wrote[/green] {out}")


@app.command("export")
def export_command(
    model: Path = typer.Argument(..., help="A checkpoint folder (converted, healed, merged) or a PEFT adapter folder."),
    out: Path = typer.Argument(..., help="The .gguf file to create; OUT.Modelfile (Ollama) is written beside it."),
    type_: str = typer.Option("f16", "--type", help="f32 | f16 | bf16 | q8_0 | q4_0 (gguf-py's quantizers) | q4_k_m (llama.cpp's quantizer: pip install 'qwenforge\\[xllamacpp]')."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base checkpoint of a PEFT adapter (default: the adapter's base_model_name_or_path). The merge holds the base in float32 in memory (4 bytes/parameter) and one merged copy on disk."),
    force: bool = typer.Option(False, "--force", help="Replace OUT and its Modelfile if they exist."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of lines."),
) -> None:
    """Export a checkpoint to one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile.

    Example: [bold]qwenforge export q3-healed/ q3-healed-q8_0.gguf --type q8_0[/bold]

    Streams tensor by tensor (memory: the largest tensor). A zero o_proj bias (llama.cpp loads none) is left out; q/k projections that fp16 or its block scales would flush to zero are refused.
    """
    from rich.progress import Progress

    from qwenforge.export.gguf import export

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("exporting", total=None)
        result = export(model, out, type_, base=base, force=force, progress=lambda done, total, name: bar.update(task, completed=done, total=total))
    if as_json:
        print_json(result)
        return
    types = ", ".join(f"{count} {name}" for name, count in result["types"].items())
    console.print(f"[green]wrote[/green] {out} ({result['architecture']}, {result['tensors']} tensors: {types})", highlight=False)
    for name, why in result["skipped"].items():
        console.print(f"left out {name}: {why}", highlight=False)
    console.print(f"[green]wrote[/green] {result['modelfile']}; load it in Ollama with:", highlight=False)
    console.print(f"  {result['ollama']}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Folder for the demo's outputs (default: a fresh one in the cache)."),
    quick: bool = typer.Option(False, "--quick", help="Shorter runs of the long steps (used by the tests)."),
) -> None:
    """The whole pipeline on the embedded real model (Qwen2.5-Coder-0.5B-Instruct), end to end: every stage prints what it did and how long it took."""
    from qwenforge.demo import run_demo

    run_demo(console, workdir=workdir, quick=quick)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="Qwen2/Qwen2.5 or Llama-shaped checkpoint folder."),
    out: Path = typer.Argument(..., help="Qwen3 checkpoint folder to create."),
    donor: Optional[Path] = typer.Option(None, help="A Qwen3 checkpoint: its tokenizer (default target) and, with --qk-norm donor, its q/k-norm."),
    tokenizer: Optional[Path] = typer.Option(None, help="Target tokenizer folder (default: the donor's, else the source's own)."),
    keep_bias: bool = typer.Option(True, "--keep-bias/--drop-bias", help="Keep q/k/v biases exactly (attention_bias=True, zero o_proj bias; the default) or drop them (the model card's choice; Qwen2.5's large biases then break the model)."),
    qk_norm: Optional[str] = typer.Option(None, help="donor | calibrated | ones (default: donor with --donor, else calibrated)."),
    new_token_init: Optional[str] = typer.Option(None, help="donor-projected | subword-calibrated | subword | mean | zero (default: donor-projected with --donor, else subword-calibrated: subword rows plus a head offset fitted on the calibration text)."),
    calibration_text: Optional[Path] = typer.Option(None, help="Text for q/k-norm calibration (default: qwenforge's calibration.txt)."),
    fidelity_text: Optional[Path] = typer.Option(None, help="Text for the fidelity measurement (default: qwenforge's heldout.txt)."),
    max_shard_size: str = typer.Option("5GB", help="Largest output shard, as in transformers (e.g. 5GB, 500MB)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the tensor map (every output tensor, its source and operation) and write nothing."),
    strict: bool = typer.Option(False, "--strict", help="Turn pre-flight warnings into errors."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle *.bin weights (tensors only)."),
    measure: bool = typer.Option(True, "--measure/--no-measure", help="Load the result for a smoke test and a fidelity measurement (loads both models)."),
    fidelity_tokens: int = typer.Option(1024, help="Tokens of the fidelity text to measure on."),
    calibration_tokens: int = typer.Option(1024, help="Tokens of the calibration text for --qk-norm calibrated."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (tensor map or metadata) instead of tables."),
    heal_method: Optional[str] = typer.Option(
        None, "--heal", help="Heal OUT right after converting, with the source as teacher: a `qwenforge heal --method` (e.g. layerwise+global, linearize)."
    ),
    heal_minutes: Optional[float] = typer.Option(None, "--heal-minutes", help="Time budget for --heal."),
    heal_train: str = typer.Option("norms+qk-lora", "--heal-train", help="What --heal trains (heal --train): norms, norms+qk-lora, attention, or vocabulary (after --tokenizer: one map places every new token's row and low-rank updates teach the layers the new tokenization, learning from the source and its own samples)."),
    formats: str = typer.Option("bf16,fp16,q8_0", "--formats", help="Also measure source and result each put in these formats (compare --formats; 'none' skips)."),
    accept_lossy: bool = typer.Option(False, "--accept-lossy", help="Exit 0 even when the measured fidelity shows a broken model (top-1 below 50% or bits/byte above x1.5)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory one loaded model may take while measuring (e.g. 16GiB); layers beyond it are read from disk as they run (default: 40% of available memory; env QWENFORGE_MAX_MEMORY)."),
) -> None:
    """Rebuild a Qwen2/Qwen2.5 (or Llama-shaped) checkpoint in the Qwen3 architecture, streaming, with provenance.

    Example: [bold]qwenforge convert Qwen2.5-7B-Instruct/ q3/ --donor Qwen3-8B/ --keep-bias --dry-run[/bold]

    Without a donor the source keeps its own tokenizer and q/k-norm is calibrated on text.
    OUT gets conversion_metadata.json (with the sha256 of every input file; a file hashed before
    and unchanged since is not read again), config_diff.json and a README with the measured fidelity.
    With --qk-norm ones or donor and --no-measure the conversion only streams: about the time of `cp`.
    """
    from rich.progress import Progress

    from qwenforge.convert.tensor_map import format_tensor_map
    from qwenforge.convert.run import ConvertOptions, convert_lines
    from qwenforge.convert.run import convert as run_convert
    from qwenforge.heal import HealOptions, convert_then_heal

    options = ConvertOptions(
        donor=donor, tokenizer=tokenizer, keep_bias=keep_bias, qk_norm=qk_norm, new_token_init=new_token_init,
        calibration_text=calibration_text, fidelity_text=fidelity_text, max_shard_size=max_shard_size,
        strict=strict, allow_pickle=allow_pickle, measure=measure, fidelity_tokens=fidelity_tokens, calibration_tokens=calibration_tokens,
        formats=None if formats == "none" else formats, accept_lossy=accept_lossy, max_memory=max_memory,
    )
    from qwenforge.heal import TRAIN_CHOICES

    if heal_train not in TRAIN_CHOICES:
        raise QwenforgeError(f"--heal-train {heal_train}: choose one of {', '.join(TRAIN_CHOICES)}")
    healing = HealOptions(method=heal_method, train=heal_train, budget_minutes=heal_minutes, formats=options.formats) if heal_method else None  # checked before converting
    if dry_run:
        result = run_convert(source, out, options, dry_run=True, force=force)
        if as_json:
            print_json({k: v for k, v in result.items() if k != "plan"} | {
                "tensors": [s.to_dict() for s in result["plan"]["steps"]], "dropped": result["plan"]["dropped"]})
            return
        console.print(format_tensor_map(result["plan"]), highlight=False, soft_wrap=True)
        console.print(f"vocabulary: {result['vocabulary']['summary']}")
        for warning in result["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {warning['message']}")
        return
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("converting", total=None)
        result = convert_then_heal(source, out, options, healing, force=force, console=None if as_json else console,
                                   progress=lambda done, total, name: bar.update(task, completed=done, total=total))
    if as_json:
        print_json(result["metadata"])
        return
    console.print(convert_lines(result["metadata"], heal_method), highlight=False)
    console.print(f"[green]wrote[/green] {out} ({result['metadata']['seconds']}s)")


@app.command()
def compare(
    a: Path = typer.Argument(..., help="Reference checkpoint folder (e.g. the source of a conversion)."),
    b: Path = typer.Argument(..., help="Candidate checkpoint folder."),
    text: Path = typer.Option(..., "--text", help="Plain-text file to measure on."),
    max_tokens: int = typer.Option(1024, help="Use the first N tokens of the text (reference tokenization)."),
    plot: Optional[Path] = typer.Option(None, help="Write a per-layer hidden-state cosine plot (PNG)."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Also measure with both models put in these formats: bf16,fp16,q8_0,q4_0,q4_k_m (GGUF types as `export --type` gives them; q4_k_m needs the xllamacpp extra), and lora (a 50-step LoRA fine-tune of each; minutes). E.g. bf16,fp16,q8_0."),
    train_text: Optional[Path] = typer.Option(None, "--train-text", help="Text the lora arm fine-tunes on (default: qwenforge's calibration.txt)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory one loaded model may take while measuring (e.g. 16GiB); layers beyond it are read from disk as they run (default: 40% of available memory; env QWENFORGE_MAX_MEMORY)."),
) -> None:
    """Fidelity of B against A on a text: bits per byte of each; KL(A||B), top-1 agreement, perplexity and per-layer cosine where tokenization is identical.

    Example: [bold]qwenforge compare Qwen2.5-7B/ q3/ --text notes.txt --plot layers.png[/bold]
    """
    from qwenforge.compare import compare_files, formats_table, summary_line

    with console.status("Measuring ..."):
        result = compare_files(a, b, text, max_tokens=max_tokens, plot=plot, formats=formats, train_text=train_text, max_memory=max_memory)
    if as_json:
        print_json(result)
        return
    console.print(f"{result['tokens']['reference']} tokens, {result['text_bytes']} bytes of {text}")
    console.print(summary_line(result))
    if not result["same_tokenization"]:
        console.print("tokenizations differ: only bits per byte is comparable")
    if "layer_cosine" in result:
        console.print("hidden-state cosine per layer: " + " ".join(f"{v:.3f}" for v in result["layer_cosine"]))
    if result.get("formats"):
        console.print("each in a format, against the float32 source (bits/byte ratio: B in it / A in it):\n" + formats_table(result["formats"]), highlight=False)
    if plot:
        console.print(f"[green]wrote[/green] {plot}")


@app.command()
def plan(
    model: str = typer.Argument(..., help="Preset name, checkpoint folder, config.json, GGUF file, Hugging Face id (config.json only), or 'embedded'."),
    revision: Optional[str] = typer.Option(None, help=_REVISION_HELP),
    mode: str = typer.Option("infer", help="infer, lora, qlora or full."),
    weights: Optional[str] = typer.Option(
        None, help="fp32, bf16, fp16, int8, nf4, gptq-int4, awq-int4, q8_0, q6_k, q5_k_m, q4_k_m, q4_1, q4_0 (default: bf16; nf4 for qlora)."
    ),
    context: int = typer.Option(4096, help="Tokens per sequence: prompt + output for inference, sequence length for training."),
    batch: int = typer.Option(1, help="Sequences at once (the micro-batch when training)."),
    generate: int = typer.Option(0, "--generate", help="Inference: how many of --context's tokens are generated (0: all prompt)."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="KV-cache dtype: auto (the engine's default), fp32, bf16, fp16, fp8 (vLLM) or q8_0 (llama.cpp)."),
    device: Optional[str] = typer.Option(None, "--device", "--devices", help="Device preset, e.g. H100-80GB, RTX-4090, M2-Ultra-64GB; 8xH100-80GB for several GPUs."),
    memory_gb: Optional[float] = typer.Option(None, "--memory", help="Usable memory in GB (GiB) of any other machine."),
    kind: str = typer.Option("cuda", help="With --memory: cuda, mps or cpu (sets the framework overhead)."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Rank the setups that fit this device preset."),
    lora_rank: int = typer.Option(16, help="LoRA rank."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha (recorded; does not change memory)."),
    lora_targets: str = typer.Option("all-linear", help="Comma-separated modules (q_proj,...,down_proj) or all-linear."),
    lora_layers: Optional[str] = typer.Option(None, help="Layer ranges that get adapters, e.g. 0-19,60-79 (default: all)."),
    lora_dropout: float = typer.Option(0.0, help="LoRA dropout (> 0 keeps a dropout copy of each adapter input)."),
    zones: Optional[Path] = typer.Option(None, help="A `qwenforge train` YAML: its zones give the per-layer targets and ranks."),
    optimizer: str = typer.Option("adamw", help="adamw, adamw-8bit or paged."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    rope_factor: float = typer.Option(1.0, help="YaRN rope-scaling factor allowing context up to factor x max positions."),
    tokens: Optional[int] = typer.Option(None, help="Training: estimate the wall time to train on this many tokens (--device, or cpu)."),
    price: Optional[float] = typer.Option(None, help="With --tokens: the device's price in USD per hour, for a cost."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: one stacked bar per candidate setup."),
) -> None:
    """Memory needed to run or train MODEL, one line per component with its assumption; what fits a device.

    Examples: [bold]qwenforge plan Qwen2.5-72B-Instruct --mode qlora --context 4096 --device M2-Ultra-64GB[/bold]
    and [bold]qwenforge plan Qwen3-32B --fit RTX-4090 --context 8192[/bold]
    """
    from qwenforge.plan_report import plan_report, plot_report, print_plan

    report = plan_report(
        model, revision=revision, device=device, memory_gb=memory_gb, kind=kind, fit=fit, mode=mode, weights=weights, context=context, generated=generate, batch=batch,
        kv_dtype=kv_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, lora_layers=lora_layers,
        lora_dropout=lora_dropout, zones=zones, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, rope_factor=rope_factor,
        tokens=tokens, price=price,
    )
    if plot:
        plot_report(report, plot)
    if as_json:
        print_json(report)
        return
    print_plan(console, report)
    if "training_time" in report:
        estimate = report["training_time"]
        cost = f", ${estimate['cost']:,.2f} at ${estimate['price_per_hour']:g}/h" if "cost" in estimate else ""
        console.print(f"training {estimate['tokens']:,} tokens on {estimate['device']}: {estimate['hours']:,.2f} h "
                      f"({estimate['tokens_per_second']:,.0f} tokens/s){cost}; throughput from {estimate['source']}")
    if plot:
        console.print(f"[green]wrote[/green] {plot}")


@app.command()
def heal(
    converted: Path = typer.Argument(..., help="The converted Qwen3 checkpoint folder (qwenforge convert's output)."),
    out: Path = typer.Argument(..., help="Folder for the healed checkpoint."),
    teacher: Path = typer.Option(..., "--teacher", help="The source checkpoint the conversion started from."),
    text: Optional[Path] = typer.Option(None, "--text", help="Healing text (.txt); default: the packaged calibration text."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Evaluation text, different from --text; default: the packaged held-out text."),
    steps: int = typer.Option(300, "--steps", help="Steps per phase (layerwise, global)."),
    train: str = typer.Option("norms+qk-lora", "--train", help="What is trained: norms, norms+qk-lora (merged back), attention, or vocabulary (after convert --tokenizer: one map that places every new token's embedding and head row, plus low-rank updates of every layer projection, merged back)."),
    method: Optional[str] = typer.Option(
        None, "--method", help="anchor (default where q/k biases were kept: closed form, weights in range), anchor+global, global, layerwise, layerwise+global (default otherwise; global with --teacher-logits), or linearize (exact in float32/bfloat16 only; fragile in float16, GGUF and training)."
    ),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop after this much healing time."),
    divergence: str = typer.Option("forward", "--divergence", help="forward, reverse, jsd or tvd (global phase)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="Default depends on --train."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="Rank of the low-rank updates (q/k with norms+qk-lora, every projection with vocabulary)."),
    ce_weight: Optional[float] = typer.Option(None, "--ce-weight", help="Cross-entropy on the text's own tokens, as a share of the global loss (1 = no teacher; default 0.5 with --train vocabulary, where new tokens have no teacher probability, else 0)."),
    sample_tokens: Optional[int] = typer.Option(
        None, "--sample-tokens", help="Also heal on this many tokens of text the teacher writes itself, a quarter prompted by --text and the rest by openers of code, markup and math (its own distribution: distillation with as much text as wanted; default 32768 with --train vocabulary, else 0)."
    ),
    teacher_logits: Optional[Path] = typer.Option(
        None, "--teacher-logits", help="A `qwenforge distill capture` store of the teacher: heal without loading its weights (global or linearize)."
    ),
    memory: Optional[float] = typer.Option(None, "--memory", help="Usable memory in GiB; default: what is available now."),
    formats: str = typer.Option("bf16,fp16,q8_0", "--formats", help="Also measure source and healed each put in these formats (compare --formats; 'none' skips)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted heal into the same OUT (weights, optimizer, step)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Give back the fidelity a conversion cost: self-distill the converted model from its source.

    Example: [bold]qwenforge heal smol-qwen3 smol-healed --teacher smol --train norms+qk-lora --budget-minutes 10[/bold]

    Which method: [bold]anchor[/bold] (the default after a conversion that kept the q/k biases) gives up one RoPE pair per layer to a constant that makes q/k-norm a near-fixed scale: real Qwen2.5-Coder-0.5B 96.9% top-1, bits/byte x1.004, in minutes, weights in their normal range (benchmarks/heal_formats.py). [bold]linearize[/bold] is exact in float32/bfloat16 but its ~1e-7 q/k weights break in float16, GGUF and training (those refuse it). The gradient methods keep a normalising q/k-norm and also train transplanted rows, but reach about 70% top-1 in minutes on a CPU (benchmarks/heal_curve.json).
    """
    from qwenforge.heal import HealOptions, heal_lines
    from qwenforge.heal import heal as run_heal

    options = HealOptions(
        train=train, method=method, steps=steps, budget_minutes=budget_minutes, text=str(text) if text else None,
        heldout=str(heldout) if heldout else None, divergence=divergence, temperature=temperature,
        learning_rate=learning_rate, lora_rank=lora_rank, ce_weight=ce_weight, sample_tokens=sample_tokens, memory_gb=memory, formats=None if formats == "none" else formats,
    )
    report = run_heal(converted, out, teacher, options, teacher_logits=teacher_logits, force=force, resume=resume, console=None if as_json else console)
    if as_json:
        print_json({key: report[key] for key in ("before", "after", "trainable_parameters", "seconds_total")})
        return
    console.print(heal_lines(report), highlight=False)
    console.print(f"[green]wrote[/green] {out} (heal_report.json, heal_kl.png)")


distill_app = typer.Typer(help="Teacher-to-student logit distillation: capture, train, online, init-student.", no_args_is_help=True)
app.add_typer(distill_app, name="distill")


def _distill_options(**values):
    from qwenforge.distill.train import DistillOptions

    return DistillOptions(**{key: value for key, value in values.items() if value is not None})


@distill_app.command("capture")
def distill_capture(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Text (.txt) or JSONL with a \"text\" field."),
    out: Path = typer.Option(..., "--out", help="Logit store folder to create."),
    k: int = typer.Option(64, "--k", help="Top-k log-probabilities kept per position."),
    values: str = typer.Option("float16", "--values", help="float16 or uint8 (square-root quantized; k=128 fits 300 bytes/token)."),
    compression: str = typer.Option("zlib", "--compression", help="zlib (default), lzma (smaller, slower) or none (plain layout)."),
    engine_name: str = typer.Option("transformers", "--engine", help="transformers, or vllm (prompt log-probs; large teachers on GPUs)."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", help="GPUs per teacher (vllm engine)."),
    sequence_length: int = typer.Option(512, "--sequence-length"),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed capture from its last complete shard."),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the teacher once and store its top-k next-token log-probabilities (sharded, resumable).

    Example: [bold]qwenforge distill capture teacher --data corpus.txt --out teacher-logits --k 64[/bold]
    """
    from qwenforge.distill.capture import capture

    index = capture(teacher, data, out, k=k, encoding=values, compression=compression, engine_name=engine_name, tensor_parallel=tensor_parallel,
                    sequence_length=sequence_length, resume=resume, force=force, console=None if as_json else console)
    facts = {key: index[key] for key in ("tokens", "k", "values", "compression", "bytes_per_token", "naive_bytes_per_token")}
    print_json(facts) if as_json else console.print(f"[green]wrote[/green] {out}: {facts}")


@distill_app.command("train")
def distill_train(
    student: Path = typer.Argument(..., help="Student checkpoint folder (same tokenizer as the store)."),
    logits: Path = typer.Option(..., "--logits", help="A store written by `distill capture`."),
    out: Path = typer.Option(..., "--out"),
    steps: int = typer.Option(200, "--steps"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes"),
    learning_rate: float = typer.Option(1e-4, "--lr"),
    divergence: str = typer.Option("forward", "--divergence", help="forward, reverse, jsd or tvd on the top-k support plus tail."),
    temperature: float = typer.Option(1.0, "--temperature"),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of cross-entropy on the text (1 = no distillation)."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="0 trains every weight; else LoRA of this rank, merged back."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    min_coverage: float = typer.Option(0.95, "--min-coverage", help="Student with another vocabulary: least share of the teacher's top-k mass it must cover."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same OUT (weights, optimizer, step, batch order)."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Train a student on a captured logit store; the store's last sequences are held out.

    Example: [bold]qwenforge distill train student --logits teacher-logits --out distilled --steps 500[/bold]
    Several GPUs: [bold]accelerate launch --config_file src/qwenforge/train/accelerate/ddp.yaml -m qwenforge.cli distill train ...[/bold]
    """
    from qwenforge.distill.train import distill_lines, train_from_store

    options = _distill_options(steps=steps, budget_minutes=budget_minutes, learning_rate=learning_rate, divergence=divergence,
                               temperature=temperature, ce_weight=ce_weight, lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing,
                               min_coverage=min_coverage)
    from qwenforge.train import ranks

    report = train_from_store(student, logits, out, options, resume=resume, force=force, console=console)
    if not ranks.is_main():  # under `accelerate launch` the main process reports
        return
    console.print(distill_lines(report), highlight=False)
    console.print(f"[green]wrote[/green] {out}")


@distill_app.command("online")
def distill_online(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint folder."),
    student: Path = typer.Argument(..., help="Student checkpoint folder (same tokenizer)."),
    data: Path = typer.Option(..., "--data", help="Training text (.txt or JSONL)."),
    heldout: Path = typer.Option(..., "--heldout", help="Evaluation text."),
    out: Path = typer.Option(..., "--out"),
    steps: int = typer.Option(200, "--steps"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes"),
    learning_rate: float = typer.Option(1e-4, "--lr"),
    divergence: str = typer.Option("forward", "--divergence"),
    temperature: float = typer.Option(1.0, "--temperature"),
    ce_weight: float = typer.Option(0.0, "--ce-weight"),
    lora_rank: int = typer.Option(0, "--lora-rank"),
    memory: Optional[float] = typer.Option(None, "--memory", help="Usable memory in GiB; default: what is available now."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Distill with teacher and student in one process (the engine heal uses).

    Example: [bold]qwenforge distill online teacher student --data train.txt --heldout eval.txt --out distilled[/bold]
    """
    from qwenforge.distill.train import distill_lines, train_online

    options = _distill_options(steps=steps, budget_minutes=budget_minutes, learning_rate=learning_rate, divergence=divergence,
                               temperature=temperature, ce_weight=ce_weight, lora_rank=lora_rank, memory_gb=memory)
    report = train_online(teacher, student, data, heldout, out, options, force=force, console=console)
    console.print(distill_lines(report), highlight=False)
    console.print(f"[green]wrote[/green] {out}")


@distill_app.command("init-student")
def distill_init_student(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint folder."),
    out: Path = typer.Argument(..., help="Student folder to create."),
    keep_layers: str = typer.Option("half", "--keep-layers", help="'half', 'first:N', or indices like 0,2,4-7."),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """A student made of a subset of the teacher's layers, written as a standard checkpoint.

    Example: [bold]qwenforge distill init-student teacher student --keep-layers half[/bold]
    """
    from qwenforge.distill.init_student import init_student

    recipe = init_student(teacher, out, keep_layers, force=force)
    console.print(f"[green]wrote[/green] {out}: {recipe['layers']} layers {recipe['keep_layers']}")


_ENGINE_HELP = "transformers (default), llama.cpp (GGUF models; pip install 'qwenforge\\[llama-cpp]'), or vllm (serve only)."


_MODEL_DEFAULT = "Default: the model's (generation_config.json; Qwen3's preset for the thinking mode)."

# Options chat, generate and serve share: one declaration each.
Temperature = Annotated[Optional[float], typer.Option(help="0 = greedy. " + _MODEL_DEFAULT)]
TopP = Annotated[Optional[float], typer.Option(help=_MODEL_DEFAULT)]
TopK = Annotated[Optional[int], typer.Option(help="0 = off. " + _MODEL_DEFAULT)]
MinP = Annotated[Optional[float], typer.Option(help=_MODEL_DEFAULT)]
PresencePenalty = Annotated[Optional[float], typer.Option(help="-2..2; Qwen suggests up to 1.5 against endless repetition.")]
RepetitionPenalty = Annotated[Optional[float], typer.Option(help=_MODEL_DEFAULT)]
Think = Annotated[Optional[bool], typer.Option("--think/--no-think", help="Qwen3 reasoning on/off (default: the template's).")]
Engine = Annotated[str, typer.Option(help=_ENGINE_HELP)]
Dtype = Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: chosen for this machine).")]
Quant = Annotated[Optional[str], typer.Option(help="none, nf4, int8 (bitsandbytes) or int8-dynamic (CPU).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N, mps or auto (offload).")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")]
MaxContext = Annotated[Optional[int], typer.Option(help="Context limit in tokens (default: the model's).")]
Revision = Annotated[Optional[str], typer.Option(help=_REVISION_HELP)]


def _sampling_options(temperature, top_p, top_k, min_p, presence_penalty, repetition_penalty, max_new_tokens, seed) -> dict:
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "presence_penalty": presence_penalty,
            "repetition_penalty": repetition_penalty, "max_new_tokens": max_new_tokens, "seed": seed}


def _load_options(engine, dtype, quant, device, base, threads, max_context, revision=None) -> dict:
    return {"engine": engine, "dtype": dtype, "quant": quant, "device": device, "base": base, "threads": threads, "max_context": max_context,
            "revision": revision}


@app.command()
def chat(
    model: str = typer.Argument("embedded", help="Checkpoint folder, Hugging Face id (Qwen/Qwen3-8B), PEFT adapter folder, .gguf file, or 'embedded'."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    max_new_tokens: int = typer.Option(512),
    seed: Optional[int] = typer.Option(None),
    think: Think = None,
    load: Optional[Path] = typer.Option(None, "--load", help="Start from a conversation saved with /save."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON list of OpenAI-style tools the model may call (/tool RESULT answers)."),
    engine: Engine = "transformers",
    dtype: Dtype = None,
    quant: Quant = None,
    device: Device = None,
    base: Optional[str] = typer.Option(None, help="Base model of an adapter folder (default: from adapter_config.json)."),
    threads: Threads = None,
    max_context: MaxContext = None,
    revision: Revision = None,
) -> None:
    """Talk to a model in the terminal: streaming Markdown answers through its own chat template.

    Commands inside: /help /system /set temperature=0.7 top_k=20 presence_penalty=1.5 /think on|off /reset /save FILE /load FILE /exit;
    /think or /no_think inside a message is Qwen3's soft switch for that turn.
    Ctrl-C stops an answer, not the session.

    Example: [bold]qwenforge chat embedded --temperature 0[/bold]
    """
    from qwenforge.infer.chat import start_chat

    start_chat(
        console, model, _load_options(engine, dtype, quant, device, base, threads, max_context, revision),
        system=system, sampling=_sampling_options(temperature, top_p, top_k, min_p, presence_penalty, repetition_penalty, max_new_tokens, seed),
        enable_thinking=think, conversation_file=load, tools_file=tools,
    )


@app.command()
def generate(
    model: str = typer.Argument(..., help="Checkpoint folder, Hugging Face id (Qwen/Qwen3-8B), PEFT adapter folder, .gguf file, or 'embedded'."),
    input: Path = typer.Option(..., "--input", "-i", help='JSONL: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} per line.'),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL answers; ids already there are skipped (resume)."),
    batch_size: int = typer.Option(8, help="Prompts per batch (left-padded)."),
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    presence_penalty: PresencePenalty = None,
    repetition_penalty: RepetitionPenalty = None,
    max_new_tokens: int = typer.Option(256),
    seed: int = typer.Option(0, help="Seeds each prompt from its position, so runs (and resumed runs) repeat."),
    think: Think = None,
    engine: Engine = "transformers",
    dtype: Dtype = None,
    quant: Quant = None,
    device: Device = None,
    base: Optional[str] = typer.Option(None, help="Base model of an adapter folder."),
    threads: Threads = None,
    max_context: MaxContext = None,
    revision: Revision = None,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    force: bool = typer.Option(False, "--force", help="Start OUTPUT over instead of resuming it."),
) -> None:
    """Answer a JSONL file of prompts in batches; resumable, deterministic with --seed.

    Example: [bold]qwenforge generate embedded -i prompts.jsonl -o answers.jsonl[/bold]
    """
    from qwenforge.infer.generate import run_generate

    summary = run_generate(
        console, model, _load_options(engine, dtype, quant, device, base, threads, max_context, revision), input, output,
        sampling=_sampling_options(temperature, top_p, top_k, min_p, presence_penalty, repetition_penalty, max_new_tokens, seed),
        batch_size=batch_size, enable_thinking=think, quiet=as_json, force=force,
    )
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"[green]wrote[/green] {summary['generated']} answers to {summary['output']} "
            f"({summary['skipped']} already there), {summary['tokens_per_second']} tokens/s"
        )


@app.command()
def serve(
    model: str = typer.Argument("embedded", help="Checkpoint folder, Hugging Face id (Qwen/Qwen3-8B), PEFT adapter folder, .gguf file, or 'embedded'."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes it)."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    served_name: Optional[str] = typer.Option(None, help="Model id clients send (default: the model folder's name)."),
    engine: Engine = "transformers",
    tensor_parallel: Optional[int] = typer.Option(None, help="GPUs per model (vllm engine; default: the fewest visible GPUs it fits on)."),
    dtype: Dtype = None,
    quant: Quant = None,
    device: Device = None,
    base: Optional[str] = typer.Option(None, help="Base model of an adapter folder."),
    threads: Threads = None,
    max_context: MaxContext = None,
    revision: Revision = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="vllm engine: print the vllm serve command instead of running it."),
    max_request_bytes: int = typer.Option(4 * 2**20, help="Largest request body; bigger ones get HTTP 413 unread."),
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions (streaming or not), /v1/models, /health.

    Example: [bold]qwenforge serve embedded --port 8000[/bold], then
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    """
    from qwenforge.infer.server import start_server

    start_server(
        console, model, _load_options(engine, dtype, quant, device, base, threads, max_context, revision),
        host=host, port=port, api_key=api_key, served_name=served_name, tensor_parallel=tensor_parallel, dry_run=dry_run,
        max_request_bytes=max_request_bytes,
    )


class _TrainGroup(typer.core.TyperGroup):
    """`qwenforge train CONFIG ...` is `qwenforge train run CONFIG ...`; `train merge` stays a sub-command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


train_app = typer.Typer(
    cls=_TrainGroup,
    no_args_is_help=True,
    help="Zone-LoRA curriculum training: per topic SFT -> evaluate -> DPO -> evaluate. "
    "Example: [bold]qwenforge train voice.yaml --show-zones[/bold]; [bold]qwenforge train merge RUN OUT[/bold].",
)
app.add_typer(train_app, name="train")


@train_app.command("run")
def train_run(
    config_file: Optional[Path] = typer.Argument(None, metavar="CONFIG", help="The training YAML (see --print-config)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config with every default, then exit."),
    show_zones: bool = typer.Option(False, "--show-zones", help="List which modules of which layers get adapters, then exit."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last finished topic or saved step."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    max_steps: Optional[int] = typer.Option(None, help="Override sft.max_steps (a short trial run)."),
    dpo_steps: Optional[int] = typer.Option(None, help="Override dpo.steps."),
    output: Optional[str] = typer.Option(None, help="Override the config's output folder."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: OMP_NUM_THREADS, else every core)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Train a model's knowledge and voice over a curriculum of topics, zone by zone.

    Example: [bold]qwenforge train --print-config > voice.yaml[/bold], edit it, then
    [bold]qwenforge train voice.yaml --show-zones[/bold] and [bold]qwenforge train voice.yaml[/bold].
    Ctrl-C saves a resumable state; [bold]--resume[/bold] continues it.
    """
    import yaml

    from qwenforge.train.config import config_to_dict, example_config, load_config

    overrides = {"sft.max_steps": max_steps, "dpo.steps": dpo_steps, "output": output, "threads": threads}
    if config_file is None:
        if not print_config:
            raise QwenforgeError("train needs a CONFIG file; `qwenforge train --print-config > train.yaml` writes a full example")
        data = example_config()
        print_json(data) if as_json else sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
        return
    config = load_config(config_file, overrides)
    for notice in config.notices:
        err_console.print(f"note: {notice}", highlight=False, soft_wrap=True)
    if print_config:
        from qwenforge.train.backends import backend_plans

        data, plans = config_to_dict(config), backend_plans(config)
        if as_json:
            print_json({**data, "backends": plans})
            return
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False) + "# What each backend does with this config on this machine:\n")
        sys.stdout.write("".join(f"#   {name} ({plan['device']}) {block}: {plan[block]}\n" for name, plan in plans.items() for block in ("sft", "dpo")))
        return
    if show_zones:
        from qwenforge.train.zones import print_zones, zones_report

        report = zones_report(config)
        print_json(report) if as_json else print_zones(console, report)
        return
    from qwenforge.train import ranks
    from qwenforge.train.pipeline import train

    result = train(config, resume=resume, force=force, console=err_console if as_json else console)
    if not ranks.is_main():  # under `accelerate launch` the main process reports
        return
    if as_json:
        print_json(result)
        return
    for topic in result["topics"]:
        stages = [(name, topic.get(name)) for name in ("before", "after_sft", "after_dpo")]
        scores = ", ".join(f"{name} acc {s['accuracy']:.3f} voice {s['voice']:.3f}" for name, s in stages if s)
        console.print(f"{topic['topic']}: {scores}; {'passed' if topic['passed'] else 'FAILED'}")
    console.print(f"[green]wrote[/green] {result['output']} in {result['seconds']:.0f}s (adapters, metrics.jsonl, metrics.png)")


@train_app.command("merge")
def train_merge(
    run: Path = typer.Argument(..., help="Output folder of `qwenforge train`."),
    out: Path = typer.Argument(..., help="Checkpoint folder to create."),
    dtype: str = typer.Option("float32", help="Weight dtype of the output: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Merge a run's adapters into its base model: a plain checkpoint folder.

    Example: [bold]qwenforge train merge runs/voice merged-voice[/bold]
    """
    from qwenforge.train.merge import merge_run

    with console.status("merging adapters ..."):
        info = merge_run(run, out, force=force, dtype=dtype)
    console.print(f"[green]wrote[/green] {out} ({len(info['adapters'])} adapter(s) merged)")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
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
