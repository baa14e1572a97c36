"""The distillation engine: divergences, the memory check and the one training loop.

`qwenforge heal` (teacher = the source model) and `qwenforge distill` (teacher = a larger model
or its stored top-k logits) both call `run_loop` with a teacher (distill/teacher.py); the
held-out figures are qwenforge/fidelity.py's.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenforge.errors import QwenforgeError

DIVERGENCES = ("forward", "reverse", "jsd", "tvd")


# --- divergences -------------------------------------------------------------------------------


def _divergence_from_logprobs(teacher: torch.Tensor, student: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence between two log-probability tensors over the same support (last dim)."""
    if kind == "forward":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if kind == "reverse":
        return (student.exp() * (student - teacher)).sum(-1)
    if kind == "jsd":
        mixture = torch.logsumexp(torch.stack([teacher, student]), 0) - math.log(2.0)
        return 0.5 * (teacher.exp() * (teacher - mixture)).sum(-1) + 0.5 * (student.exp() * (student - mixture)).sum(-1)
    if kind == "tvd":
        return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)
    raise QwenforgeError(f"divergence {kind!r}: choose one of {', '.join(DIVERGENCES)}")


def full_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence on the full shared vocabulary, both sides softened by `temperature`.

    Scaled by T^2 (Hinton) so gradients keep their size across temperatures.
    """
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student = F.log_softmax(student_logits[..., :vocab].float() / temperature, -1)
    teacher = F.log_softmax(teacher_logits[..., :vocab].float() / temperature, -1)
    return _divergence_from_logprobs(teacher, student, kind) * temperature**2


def piece_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, pieces: torch.Tensor, kind: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence over the teacher's vocabulary, for a student of another one: the student's
    probabilities summed by the teacher piece each of its tokens starts with (`pieces`, -1 for none), so a
    new token (".set") counts for its first piece (".") and every row's mass answers to the teacher, where
    a KL on the shared tokens alone leaves the new ones out. 8 minutes of a vocabulary heal: 1.2083 ->
    1.2052 bits/byte on heldout.txt (benchmarks/vocab_transplant.py)."""
    width = teacher_logits.shape[-1]
    probs = F.softmax(student_logits.float() / temperature, -1)
    pieces = pieces[: probs.shape[-1]].to(probs.device)
    summed = torch.zeros(*probs.shape[:-1], width + 1, device=probs.device).index_add(-1, pieces.where(pieces >= 0, width), probs)
    student = summed[..., :width].clamp(min=1e-9).log()
    teacher = F.log_softmax(teacher_logits.float() / temperature, -1)
    return _divergence_from_logprobs(teacher, student, kind) * temperature**2


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence on the teacher's top-k tokens plus one explicit tail bucket.

    The teacher's tail mass is 1 - sum(top-k); the student's is its probability outside those k
    tokens. Both become (k+1)-way distributions, so no mass is silently dropped. With a
    temperature, each side's k+1 log-probabilities are divided by T and renormalized.
    Entries with teacher log-probability -inf are absent (a token the student's vocabulary lacks,
    distill/mapping.py): they count as zero mass on both sides, so that mass sits in the tails.
    """
    student_all = F.log_softmax(student_logits.float(), -1)
    student_top = student_all.gather(-1, teacher_indices.long())
    teacher_top = teacher_logprobs.float()
    present = torch.isfinite(teacher_top)
    if not present.all():  # a large finite floor: exp() is 0 and 0 * floor stays 0 (no nan)
        teacher_top = teacher_top.masked_fill(~present, -1e4)
        student_top = student_top.masked_fill(~present, -1e4)
    teacher_tail = torch.log1p(-teacher_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    student_tail = torch.log1p(-student_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    teacher = torch.cat([teacher_top, teacher_tail], -1)
    student = torch.cat([student_top, student_tail], -1)
    if temperature != 1.0:
        teacher = F.log_softmax(teacher / temperature, -1)
        student = F.log_softmax(student / temperature, -1)
    return _divergence_from_logprobs(teacher, student, kind) * temperature**2


# --- memory ---------------------------------------------------------------------------------------


def weights_bytes(folder) -> int:
    """Float32 bytes of a checkpoint's weights: from its architecture, else from its files (assumed 16-bit)."""
    from qwenforge.arch.spec import spec_from_config, weight_bytes
    from qwenforge.checkpoint.folder import read_config

    folder = Path(folder)
    try:
        return weight_bytes(spec_from_config(read_config(folder), str(folder / "config.json")))["fp32"]
    except QwenforgeError:
        return 2 * sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def memory_estimate(teacher_dir: Path | None, student_dir: Path, vocab: int, eval_tokens: int, options: LoopOptions, full_student: bool = False) -> dict:
    """Bytes a heal or distill run holds in float32: the teacher (None: read from a store, never loaded), the
    student (with gradients and Adam's two moments when every weight trains: `full_student`), held-out
    teacher log-probabilities and one batch's logits about four times over (teacher, student, softmax, gradient)."""
    estimate = {
        "teacher": weights_bytes(teacher_dir) if teacher_dir is not None else 0,
        "student": weights_bytes(student_dir) * (4 if full_student else 1),
        "working": 4 * vocab * (eval_tokens + 4 * options.batch_size * options.sequence_length),
    }
    estimate["total"] = sum(estimate.values())
    return estimate


def check_fits(estimate: dict, memory_gb: float | None, what: str, remedy: str) -> dict:
    """`estimate` (bytes per part, and "total") against the usable memory; else one line: what needs how much, and the remedy."""
    from qwenforge.devices import GIB, available_memory

    available = int(memory_gb * GIB) if memory_gb else available_memory("cpu")
    if estimate["total"] <= available:
        return estimate
    raise QwenforgeError(f"{what} need about {estimate['total'] / GIB:.2f} GiB in float32 ({available / GIB:.2f} GiB available); {remedy}")


# --- the loop ------------------------------------------------------------------------------------


def check_option(flag: str, value, ok: bool, need: str) -> None:
    """One line naming the flag when an option's value is unusable (None means "the default": never checked)."""
    if value is not None and not ok:
        raise QwenforgeError(f"{flag} {value}: {need}")


@dataclass(frozen=True)
class LoopOptions:
    """The options every heal and distill loop shares, checked when built (a bad value fails before any work).

    `HealOptions` and `DistillOptions` add their own fields and defaults; `run_loop` reads these.
    """

    steps: int = 200
    budget_minutes: float | None = None
    learning_rate: float | None = 1e-4
    batch_size: int = 4
    sequence_length: int = 256
    divergence: str = "forward"
    temperature: float = 1.0
    eval_every: int = 20
    patience: int = 5  # evaluations without a better held-out KL before stopping early
    threads: int | None = None
    seed: int = 0
    memory_gb: float | None = None  # usable memory; default: what this machine has available now

    def __post_init__(self) -> None:
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--sequence-length", self.sequence_length),
                            ("--eval-every", self.eval_every), ("--patience", self.patience), ("--threads", self.threads)):
            check_option(flag, value, value is None or value >= 1, "must be at least 1")
        for flag, value in (("--budget-minutes", self.budget_minutes), ("--lr", self.learning_rate), ("--temperature", self.temperature), ("--memory", self.memory_gb)):
            check_option(flag, value, value is None or value > 0, "must be above 0")
        check_option("--divergence", self.divergence, self.divergence in DIVERGENCES, f"choose one of {', '.join(DIVERGENCES)}")


@dataclass
class LoopResult:
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"


def run_loop(
    named_parameters: dict[str, torch.nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    evaluate: Callable[[], dict],
    settings: LoopOptions,
    *,
    label: str = "distill",
    console=None,
    start_step: int = 0,
    elapsed: float = 0.0,
    history: list[dict] | None = None,
    optimizer_state: dict | None = None,
    best_state: dict[str, torch.Tensor] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    score: str = "kl",
    rates: dict[str, float] | None = None,
) -> LoopResult:
    """Train `named_parameters` on `step_loss(step)`; evaluate every `eval_every` steps.

    Keeps the parameters of the best held-out `score` (an `evaluate()` figure, lower is better: KL,
    or bits_per_byte where the vocabulary itself changed), restored at the end; stops at the step
    budget, the time budget, or after `patience` evaluations without improvement.
    `on_checkpoint` receives the loop state after each evaluation (for --resume: `save_progress`);
    the learning rate is constant, so step, optimizer moments and best weights are the whole state.
    `rates`: a learning rate of their own for some parameters (by name); the rest take settings.learning_rate.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rates = rates or {}
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in named_parameters.items():
        groups.setdefault(rates.get(name, settings.learning_rate), []).append(parameter)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()], weight_decay=0.0)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    result = LoopResult(history=list(history or []), steps=start_step)
    if result.history:
        result.best = min(result.history, key=lambda row: row[score])
    else:
        metrics = evaluate()
        result.best = {"step": start_step, "seconds": elapsed, "loss": None, **metrics}
        result.history.append(result.best)
    if best_state is None:  # a resumed run hands in the weights of its best evaluation
        best_state = {name: p.detach().clone() for name, p in named_parameters.items()}
    bad_evals = len(result.history) - 1 - result.history.index(result.best)  # evaluations since the best (resume)
    started = time.perf_counter() - elapsed
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("{task.fields[status]}")]
    shown = {"kl": "KL", "bits_per_byte": "bits/byte"}.get(score, score)  # the figure that picks the step
    status = lambda: f"{shown} {result.best[score]:.4f} top-1 {result.best['top1_agreement']:.1%}"  # noqa: E731
    with Progress(*columns, console=console, transient=False, disable=console is None) as progress:
        task = progress.add_task(label, total=settings.steps, completed=start_step, status=status())
        loss_value = float("nan")
        for step in range(start_step, settings.steps):
            if settings.budget_minutes is not None and time.perf_counter() - started > settings.budget_minutes * 60:
                result.stopped = "time"
                break
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(step)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            result.steps = step + 1
            progress.update(task, advance=1, status=f"loss {loss_value:.4f} | best {status()}")
            if result.steps % settings.eval_every == 0 or result.steps == settings.steps:
                metrics = evaluate()
                row = {"step": result.steps, "seconds": time.perf_counter() - started, "loss": loss_value, **metrics}
                result.history.append(row)
                if row[score] < result.best[score]:
                    result.best, bad_evals = row, 0
                    best_state = {name: p.detach().clone() for name, p in named_parameters.items()}
                else:
                    bad_evals += 1
                progress.update(task, status=f"held-out {shown} {row[score]:.4f} top-1 {row['top1_agreement']:.1%} | best {status()}")
                if on_checkpoint:
                    on_checkpoint({"step": result.steps, "seconds": row["seconds"], "history": result.history, "optimizer": optimizer.state_dict(), "best_state": best_state})
                if bad_evals >= settings.patience:
                    result.stopped = "early"
                    break
    if result.history[-1]["step"] != result.steps:  # time budget hit between evaluations
        metrics = evaluate()
        row = {"step": result.steps, "seconds": time.perf_counter() - started, "loss": loss_value, **metrics}
        result.history.append(row)
        if row[score] < result.best[score]:
            result.best = row
            best_state = {name: p.detach().clone() for name, p in named_parameters.items()}
    with torch.no_grad():
        for name, parameter in named_parameters.items():
            parameter.copy_(best_state[name])
    result.seconds = time.perf_counter() - started
    return result


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    kind: str = "forward",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    student_ids: torch.Tensor | None = None,
    student_pieces: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean divergence to the teacher (full logits or stored top-k) mixed with cross-entropy on the text.

    `student_ids`: the student's columns the teacher's logits stand for (tokens both vocabularies hold);
    `student_pieces`: instead, the teacher's full logits against the student's probabilities summed by piece.
    """
    if teacher_logits is not None and student_pieces is not None:
        divergence = piece_divergence(student_logits, teacher_logits, student_pieces, kind, temperature)
    elif teacher_logits is not None:
        divergence = full_divergence(student_logits if student_ids is None else student_logits[..., student_ids], teacher_logits, kind, temperature)
    elif teacher_topk is not None:
        divergence = topk_divergence(student_logits, teacher_topk[0], teacher_topk[1], kind, temperature)
    else:
        divergence = torch.zeros(student_logits.shape[:-1])
    loss = (1 - ce_weight) * divergence.mean()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student_logits.flatten(0, -2).float(), labels.flatten())
    return loss


# --- --resume ----------------------------------------------------------------------------------


def progress_folder(out: Path, verb: str) -> Path:
    """Where `heal`/`distill train` keep their --resume state: a hidden folder beside OUT, removed once OUT is written."""
    return Path(out).parent / f".{verb}-work-{Path(out).name}"


def save_progress(folder: Path, named_parameters: dict[str, torch.nn.Parameter], state: dict, extra: dict | None = None) -> None:
    """A loop checkpoint (from `on_checkpoint`) in safetensors + JSON, swapped in whole (a kill leaves the previous one).

    Files: weights now, weights at the best evaluation, optimizer moments; state.json holds the
    step, history, optimizer settings and `extra` (e.g. a random generator's state).
    """
    import shutil

    from safetensors.torch import save_file

    from qwenforge.checkpoint.folder import write_json

    folder = Path(folder)
    temp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    save_file({name: p.detach().contiguous() for name, p in named_parameters.items()}, str(temp / "weights.safetensors"))
    save_file({name: value.contiguous() for name, value in state["best_state"].items()}, str(temp / "best.safetensors"))
    moments = {f"{index}.{key}": value.contiguous() for index, entry in state["optimizer"]["state"].items() for key, value in entry.items()}
    save_file(moments, str(temp / "optimizer.safetensors"))
    saved = {"step": state["step"], "seconds": state["seconds"], "history": state["history"], "optimizer_groups": state["optimizer"]["param_groups"]}
    write_json(temp / "state.json", saved | {"extra": extra or {}})
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(temp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_progress(folder: Path, named_parameters: dict[str, torch.nn.Parameter]) -> dict | None:
    """Copy a checkpoint's weights into `named_parameters`; returns run_loop's resume arguments and `extra` (None: no checkpoint)."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "state.json").exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # killed during the swap
    if not (folder / "state.json").exists():
        return None
    saved = json.loads((folder / "state.json").read_text())
    weights = load_file(str(folder / "weights.safetensors"))
    if set(weights) != set(named_parameters):
        raise QwenforgeError(f"{folder}: the checkpoint's trainable weights do not match this run (another --lora-rank or student?); resume with the same settings")
    with torch.no_grad():
        for name, value in weights.items():
            named_parameters[name].copy_(value)
    state: dict[int, dict] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {
        "start_step": saved["step"],
        "elapsed": saved["seconds"],
        "history": saved["history"],
        "optimizer_state": {"state": state, "param_groups": saved["optimizer_groups"]},
        "best_state": load_file(str(folder / "best.safetensors")),
        "extra": saved["extra"],
    }
