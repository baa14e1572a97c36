"""A logit store read by a student with another vocabulary: teacher ids mapped to student ids by token string.

The alignment is the converter's (`convert.vocab.align`, tokens matched by string, never by id).
Positions must mean the same thing for both models, so the rule is: the student's tokenizer must
split the captured text exactly as the teacher's did (checked on the store's sequences: each is
decoded and re-tokenized by both; a sequence that does not even round-trip through the teacher's
own tokenizer, e.g. cut inside a character, is skipped). Only the output distribution is mapped;
teacher tokens the student lacks become absent entries (log-probability -inf), their mass joins
the tail. Coverage = the share of the stored top-k mass that falls on tokens the student has;
below `min_coverage` the store is refused with the figure. Qwen2.5 vs Qwen3 tokenizers (4 added
tokens apart) pass; SmolLM2 vs Qwen is refused (different splits of the same text).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenforge.errors import QwenforgeError

CHECK_SHARDS = 8  # shards read to measure coverage and check tokenization (the first ones)


def _teacher_tokenizer_folder(folder: Path, index: dict) -> Path:
    own = Path(folder) / "tokenizer"
    if (own / "tokenizer.json").exists():
        return own
    teacher = Path(index.get("teacher", ""))
    if (teacher / "tokenizer.json").exists():
        return teacher
    raise QwenforgeError(f"{folder}: the store has no tokenizer/ folder and its teacher {teacher} is gone; capture again to map another vocabulary")


def lookup_table(teacher_folder: Path, student_folder: Path, rows: int) -> torch.Tensor:
    """teacher id -> student id (-1 where the student has no token of that string), over `rows` ids."""
    from qwenforge.convert.vocab import align, load_tokenizer

    teacher, student = load_tokenizer(teacher_folder), load_tokenizer(student_folder)
    vocab_map = align(teacher, student, len(teacher), len(student))
    table = torch.full((max(rows, len(teacher)),), -1, dtype=torch.long)
    for student_id, teacher_id in vocab_map.shared.items():
        table[teacher_id] = student_id
    return table


def map_entries(table: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-k entries in student ids, still highest first; absent ones last with log-probability -inf."""
    mapped = table[indices]
    logprobs = logprobs.masked_fill(mapped < 0, float("-inf"))
    logprobs, order = logprobs.sort(dim=-1, descending=True, stable=True)
    return mapped.gather(-1, order).clamp(min=0), logprobs


def map_input_ids(table: torch.Tensor, ids: torch.Tensor, where: str) -> torch.Tensor:
    mapped = table[ids]
    if (mapped < 0).any():
        raise QwenforgeError(f"{where}: the captured text uses teacher tokens the student's vocabulary lacks; the positions cannot align")
    return mapped


def build(folder: Path, index: dict, student_tokenizer, shards, min_coverage: float) -> tuple[torch.Tensor, dict]:
    """(lookup table, facts) for reading store `folder` with `student_tokenizer`, or a refusal naming the figure."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    student_folder = Path(getattr(student_tokenizer, "name_or_path", ""))
    if not (student_folder / "tokenizer.json").exists():
        raise QwenforgeError(f"{folder}: captured with another tokenizer, and the student's tokenizer has no tokenizer.json folder to map it by string")
    teacher_folder = _teacher_tokenizer_folder(folder, index)
    table = lookup_table(teacher_folder, student_folder, index["vocab_size"])
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_folder)
    covered = stored = 0.0
    checked = differ = 0
    for number, (ids, indices, logprobs) in enumerate(shards):
        if number >= CHECK_SHARDS:
            break
        mass = logprobs.float().exp()
        stored += float(mass.sum())
        covered += float((mass * (table[indices] >= 0)).sum())
        for row in ids.tolist():
            text = teacher_tokenizer.decode(row)
            if teacher_tokenizer(text, add_special_tokens=False)["input_ids"] != row:
                continue
            checked += 1
            differ += student_tokenizer(text, add_special_tokens=False)["input_ids"] != table[torch.tensor(row)].tolist()
    coverage = covered / max(stored, 1e-12)
    facts = {"teacher_tokenizer": str(teacher_folder), "student_tokenizer": str(student_folder), "coverage": coverage,
             "shared_tokens": int((table >= 0).sum()), "checked_sequences": checked}
    if not checked or differ:
        raise QwenforgeError(
            f"{folder}: the student's tokenizer splits the captured text differently from the teacher's ({differ} of {checked} checked sequences differ; "
            f"vocabulary coverage {coverage:.2%}); positions would not align: capture with a teacher that tokenizes like the student"
        )
    if coverage < min_coverage:
        raise QwenforgeError(
            f"{folder}: the student's vocabulary covers {coverage:.2%} of the teacher's top-k mass, below --min-coverage {min_coverage:.0%}; "
            "use a student sharing the teacher's vocabulary or lower --min-coverage"
        )
    return table, facts
