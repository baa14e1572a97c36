"""`qwenforge distill train` (from a logit store) and `qwenforge distill online` (teacher in-process).

Both build a loss for the engine's loop: divergence to the teacher (top-k + tail from the store,
or full distributions online) mixed with cross-entropy by `ce_weight`; `ce_weight=1` is plain
cross-entropy training, the baseline distillation must beat. The student is trained fully or
through LoRA (merged back), and written as a plain checkpoint with distill_report.json.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwenforge import __version__
from qwenforge.checkpoint.folder import read_config, refuse_overlap, trained_output
from qwenforge.distill import engine, store
from qwenforge.distill.teacher import LiveTeacher, Schedule, StoredTeacher, Vocabulary
from qwenforge.errors import QwenforgeError
from qwenforge.fidelity import byte_counts, token_sequences
from qwenforge.train.plot import plot_curves


@dataclass(frozen=True)
class DistillOptions(engine.LoopOptions):
    """`distill train` / `distill online` options: the loop's (engine.LoopOptions) and these, checked when built."""

    ce_weight: float = 0.0
    lora_rank: int = 0  # 0: full fine-tuning
    gradient_checkpointing: bool = False
    heldout_sequences: int = 4  # store mode: the store's last sequences, never trained on
    max_tokens: int | None = None
    eval_tokens: int | None = 2048  # online mode: held-out tokens evaluated (full teacher distributions are kept in memory)
    min_coverage: float = 0.95  # store mode, other vocabulary: least share of the teacher's top-k mass the student must have

    def __post_init__(self) -> None:
        super().__post_init__()
        engine.check_option("--ce-weight", self.ce_weight, 0 <= self.ce_weight <= 1, "must be between 0 and 1")
        engine.check_option("--lora-rank", self.lora_rank, self.lora_rank >= 0, "must be 0 (full fine-tuning) or more")
        engine.check_option("--min-coverage", self.min_coverage, 0 < self.min_coverage <= 1, "must be above 0 and at most 1")
        for flag, value in (("--heldout-sequences", self.heldout_sequences), ("--max-tokens", self.max_tokens), ("--eval-tokens", self.eval_tokens)):
            engine.check_option(flag, value, value is None or value >= 1, "must be at least 1")


def _load_student(folder: Path, options: DistillOptions):
    from transformers import AutoModelForCausalLM

    read_config(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if options.lora_rank:
        from peft import LoraConfig, get_peft_model

        from qwenforge.arch.spec import PROJECTIONS

        model = get_peft_model(model, LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, target_modules=list(PROJECTIONS), lora_dropout=0.0))
    model.train()
    return model


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save(model, student_dir: Path, out: Path, report: dict, force: bool) -> None:
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with trained_output(model, out, student_dir, "distill_report.json", report, force) as folder:
        plot_curves(folder / "distill_curve.png", {"distill": report["history"]}, "step", "step",
                    {"kl": "held-out KL to teacher", "bits_per_byte": "held-out bits per byte"})


def _refuse_fragile(student_dir: Path) -> None:
    from qwenforge.convert.qk_norm import fragile_qk_reason

    if reason := fragile_qk_reason(student_dir):
        raise QwenforgeError(f"distill: {reason}")


def train_online(teacher_dir: Path, student_dir: Path, data: Path, heldout: Path, out: Path | None, options: DistillOptions = DistillOptions(), *, force: bool = False, console=None) -> dict:
    """Teacher and student in one process: the teacher's full distribution, no_grad, per batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    if out is not None:
        refuse_overlap(out, {"teacher": teacher_dir, "student": student_dir, "data": data, "held-out text": heldout})
    read_config(teacher_dir), read_config(student_dir)  # a missing folder is one line, not the hub's "Repo id" error
    train_text, heldout_text = store.read_text(data), store.read_text(heldout)  # before any model is loaded
    if out is not None and Path(out).exists() and not force:
        raise QwenforgeError(f"{out}: already exists; choose another output or pass --force to replace it")
    _refuse_fragile(student_dir)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    if not store.same_vocabulary(teacher_dir, tokenizer):
        raise QwenforgeError(
            f"{student_dir} and {teacher_dir} have different tokenizers; online distillation needs one vocabulary: "
            "run `qwenforge distill capture` on the teacher and `distill train --logits`, which maps vocabularies by token string"
        )
    estimate = engine.memory_estimate(teacher_dir, student_dir, len(tokenizer), options.eval_tokens or 0, options, full_student=options.lora_rank == 0)
    engine.check_fits(
        estimate, options.memory_gb, f"{teacher_dir}: teacher and student together would",
        f"capture the teacher once with `qwenforge distill capture {teacher_dir} --data TEXT --out STORE` and run `distill train --logits STORE`",
    )
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    student = _load_student(student_dir, options)
    max_positions = getattr(student.config, "max_position_embeddings", None)
    if max_positions and options.sequence_length > max_positions:
        raise QwenforgeError(f"--sequence-length {options.sequence_length} exceeds the student's context of {max_positions} tokens")
    train_sequences = token_sequences(tokenizer, train_text, options.sequence_length, options.max_tokens, str(data))
    eval_sequences = token_sequences(tokenizer, heldout_text, options.sequence_length, options.eval_tokens, str(heldout))
    schedule = Schedule(len(train_sequences), options.batch_size, shuffle=True, seed=options.seed)
    teacher = LiveTeacher(model, Vocabulary.same(len(tokenizer)), train_sequences, eval_sequences, byte_counts(tokenizer, eval_sequences), schedule)

    def step_loss(step: int) -> torch.Tensor:
        batch = teacher.batch(step)
        return teacher.loss(student(batch.ids[:, :-1]).logits, batch, options.divergence, options.temperature, options.ce_weight)

    evaluate = lambda: teacher.evaluate(student)  # noqa: E731
    started = time.perf_counter()
    result = engine.run_loop(_trainable(student), step_loss, evaluate, options, label="distill online", console=console)
    report = {
        "qwenforge_version": __version__,
        "mode": "online",
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "data": str(data),
        "heldout": str(heldout),
        "options": asdict(options),
    } | _outcome(student, result, options.batch_size * options.sequence_length, started)
    if out is not None:
        _save(student, student_dir, Path(out), report, force)
    return report


def _outcome(student, result, tokens_per_step: int, started: float) -> dict:
    """The report fields both training modes share: what was trained, how far, and the curve."""
    return {
        "trainable_parameters": sum(p.numel() for p in _trainable(student).values()),
        "tokens_trained": result.steps * tokens_per_step,
        "before": result.history[0],
        "best": result.best,
        "history": result.history,
        "steps": result.steps,
        "stopped": result.stopped,
        "seconds": time.perf_counter() - started,
    }


def distill_lines(report: dict) -> str:
    """Human lines for a distill report (what `qwenforge distill train|online` prints)."""
    lines = []
    if (report.get("store") or {}).get("student_map"):
        lines.append(f"vocabulary mapped by token string: coverage {report['store']['student_map']['coverage']:.2%} of the teacher's top-k mass")
    before, best = report["before"], report["best"]
    lines.append(f"held-out KL {before['kl']:.4f} -> {best['kl']:.4f}; bits/byte {before['bits_per_byte']:.4f} -> {best['bits_per_byte']:.4f}")
    return "\n".join(lines)


def _fingerprints(trainable: dict, world: int) -> list[float]:
    """Sum of |weights| on every rank (equal when the processes trained in step)."""
    value = float(sum(p.detach().double().abs().sum() for p in trainable.values()))
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


RESUME_KEYS = ("learning_rate", "batch_size", "divergence", "temperature", "ce_weight", "lora_rank", "heldout_sequences", "seed")


def train_from_store(student_dir: Path, logits: Path, out: Path | None, options: DistillOptions = DistillOptions(), *, resume: bool = False, force: bool = False, console=None) -> dict:
    """Train the student on a captured store; the store's last sequences are the held-out set.

    The store is read shard by shard (distill/teacher.py: StoredTeacher), each epoch in shuffled
    shards, so memory holds two shards, never the store. With OUT, each evaluation checkpoints
    weights, best weights, optimizer moments and step beside OUT; `resume` continues from there
    exactly where it stopped (the batches are a function of the step), and may raise `steps`.

    Under `accelerate launch` (DDP: train/accelerate/ddp.yaml, or `--cpu` with gloo) every process
    draws the same global batch from the step and trains its slice through the
    prepared (gradient-averaging) model, so all ranks hold the same weights, evaluate alike and stop
    alike; only the main process checkpoints and writes OUT. FSDP / ZeRO-3 sharding is not handled.
    """
    import shutil

    from transformers import AutoTokenizer

    from qwenforge.train import ranks

    ranks.join()
    world, rank = ranks.world_size(), 0
    if world > 1:
        import torch.distributed as dist

        rank = dist.get_rank()

    console = console if rank == 0 else None  # under `accelerate launch` the main process shows progress
    student_dir, logits = Path(student_dir), Path(logits)
    if out is not None:
        refuse_overlap(out, {"student": student_dir, "logit store": logits})
    student_config = read_config(student_dir)
    if out is not None and Path(out).exists() and not force:
        raise QwenforgeError(f"{out}: already exists; choose another output or pass --force to replace it")
    checkpoint = engine.progress_folder(out, "distill") if out is not None else None
    if resume and (checkpoint is None or not (checkpoint / "state.json").exists() and not checkpoint.with_name(checkpoint.name + ".old").exists()):
        raise QwenforgeError(f"{checkpoint}: no checkpoint to resume (none was written before the first evaluation); run without --resume")
    if checkpoint is not None and checkpoint.exists() and not resume and not force:
        raise QwenforgeError(f"{checkpoint}: an interrupted run's checkpoint exists; pass --resume to continue it or --force to start over")
    _refuse_fragile(student_dir)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    index = store.open_store(logits, tokenizer, options.min_coverage)
    sizes = [shard["sequences"] for shard in index["shards"]]
    if sum(sizes) <= options.heldout_sequences:
        raise QwenforgeError(f"{logits}: only {sum(sizes)} sequences; capture more data than --heldout-sequences {options.heldout_sequences}")
    max_positions = student_config.get("max_position_embeddings")
    if max_positions and index["sequence_length"] > max_positions:
        raise QwenforgeError(f"{logits}: sequences of {index['sequence_length']} tokens exceed the student's context of {max_positions}")
    schedule = Schedule(sum(sizes) - options.heldout_sequences, options.batch_size, shuffle=True, seed=options.seed, blocks=tuple(sizes))
    teacher = StoredTeacher(logits, index, options.heldout_sequences, schedule, tokenizer)
    student = _load_student(student_dir, options)
    forward = student
    if world > 1:
        from accelerate import Accelerator

        forward = Accelerator(cpu=not torch.cuda.is_available()).prepare_model(student)
    device = next(student.parameters()).device
    trainable = _trainable(student)
    saved = {}
    if resume:
        saved = engine.load_progress(checkpoint, trainable)
        changed = [key for key in RESUME_KEYS if saved["extra"]["options"].get(key) != asdict(options)[key]]
        changed += ["processes"] if saved["extra"].get("processes", 1) != world else []
        if changed or saved["extra"]["logits"] != str(logits) or saved["extra"]["student"] != str(student_dir):
            raise QwenforgeError(f"{checkpoint}: saved by a run with other {', '.join(changed) or 'student or logits'}; resume with the same settings or pass --force")
        saved.pop("extra")  # the batches are a function of the step (teacher.Schedule): nothing else to restore
    elif checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)

    def step_loss(step: int) -> torch.Tensor:
        batch = teacher.batch(step, rank, world).to(device)
        return teacher.loss(forward(batch.ids[:, :-1]).logits, batch, options.divergence, options.temperature, options.ce_weight)

    def on_checkpoint(state: dict) -> None:
        if rank:
            return
        extra = {"options": asdict(options), "logits": str(logits), "student": str(student_dir), "processes": world}
        engine.save_progress(checkpoint, trainable, state, extra)

    evaluate = lambda: teacher.evaluate(student)  # noqa: E731
    started = time.perf_counter()
    result = engine.run_loop(trainable, step_loss, evaluate, options, label="distill train", console=console,
                             on_checkpoint=on_checkpoint if checkpoint is not None else None, **saved)
    report = {
        "qwenforge_version": __version__,
        "mode": "store",
        "student": str(student_dir),
        "logits": str(logits),
        "store": {key: index[key] for key in ("teacher", "k", "values", "bytes_per_token", "tokenizer_hash")} | {"student_map": index.get("student_map")},
        "options": asdict(options),
        "resumed_from_step": saved.get("start_step"),
        "processes": world,
        "rank_fingerprints": _fingerprints(trainable, world),
    } | _outcome(student, result, options.batch_size * world * index["sequence_length"], started)
    if out is not None and rank == 0:
        _save(student, student_dir, Path(out), report, force)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return report
