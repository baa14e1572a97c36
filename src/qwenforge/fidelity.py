"""Held-out fidelity figures: how close a student's next-token distributions are to a teacher's.

One implementation of KL, top-1 agreement, bits per byte and perplexity, used by `compare`,
`convert` (its measurement), `heal` and `distill`; plus the text -> sequences cutting and the ids
two tokenizers share. Imports nothing of qwenforge's stages, so every stage can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenforge.errors import QwenforgeError


@dataclass
class Fidelity:
    """Sums over evaluated positions; `summary()` turns them into the reported figures."""

    positions: int = 0
    text_bytes: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    student_nll: float = 0.0
    teacher_nll: float = 0.0

    def add(self, student_logits, teacher_logprobs, labels, text_bytes: int, shared: torch.Tensor | None = None, teacher_shared: torch.Tensor | None = None) -> None:
        """Add one sequence's positions: logits [T, V], teacher log-probs [T, V] (full), labels [T].

        KL and agreement are taken over the `shared` ids only (both renormalized there), so rows a
        conversion transplanted or padded do not count; bits per byte use each model's full distribution.
        `teacher_shared` names the same tokens in the teacher's ids (default: the same ids); a teacher
        of another vocabulary has no log-probability for the student's labels, so its NLL is not summed
        here (`teacher_nll` is then set by the caller from the teacher's own tokenization).
        """
        student_full = F.log_softmax(student_logits.float(), -1)
        teacher_full = teacher_logprobs.float()
        if shared is None:
            shared = torch.arange(min(student_full.shape[-1], teacher_full.shape[-1]))
        student = _renormalized(student_full, shared)
        teacher = _renormalized(teacher_full, shared if teacher_shared is None else teacher_shared)
        self.positions += labels.numel()
        self.text_bytes += text_bytes
        self.kl_sum += float((teacher.exp() * (teacher - student)).sum())
        self.agree += int((student.argmax(-1) == teacher.argmax(-1)).sum())
        self.student_nll -= float(student_full.gather(-1, labels[:, None]).sum())
        if teacher_shared is None:
            self.teacher_nll -= float(teacher_full.gather(-1, labels[:, None]).sum())

    def summary(self) -> dict:
        if not self.positions:
            raise QwenforgeError("no held-out positions were evaluated; give a longer held-out text")
        bits = 1 / math.log(2) / max(self.text_bytes, 1)
        return {
            "kl": self.kl_sum / self.positions,
            "top1_agreement": self.agree / self.positions,
            "bits_per_byte": self.student_nll * bits,
            "teacher_bits_per_byte": self.teacher_nll * bits,
            "perplexity": math.exp(self.student_nll / self.positions),
            "teacher_perplexity": math.exp(self.teacher_nll / self.positions),
            "positions": self.positions,
        }


def _renormalized(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log-probabilities renormalized over the columns `ids`. With one tokenizer the ids are 0..n-1
    (padding rows left out): a slice, not a copy of [T, 151936] floats, and nothing to redo when n is every column."""
    if ids.dtype == torch.long and torch.equal(ids, torch.arange(len(ids))):
        return logprobs if len(ids) == logprobs.shape[-1] else F.log_softmax(logprobs[..., : len(ids)], -1)
    return F.log_softmax(logprobs.index_select(-1, ids), -1)


def token_sequences(tokenizer, text: str, length: int, limit_tokens: int | None = None, what: str = "text") -> list[torch.Tensor]:
    """Cut a text's tokens into consecutive sequences of `length` (+1 for the shifted label)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if limit_tokens:
        ids = ids[:limit_tokens]
    if len(ids) < min(length, 64) + 1:
        raise QwenforgeError(f"{what}: only {len(ids)} tokens; give at least {min(length, 64) + 1}")
    length = min(length, len(ids) - 1)
    tensor = torch.tensor(ids)
    return [tensor[start : start + length + 1] for start in range(0, len(ids) - length, length)]


def byte_counts(tokenizer, sequences: list[torch.Tensor]) -> list[int]:
    """UTF-8 bytes of the predicted part of each sequence (for bits per byte)."""
    return [len(tokenizer.decode(ids[1:].tolist()).encode("utf-8")) for ids in sequences]


def shared_ids(tokenizer_a, tokenizer_b, rows_a: int, rows_b: int) -> torch.Tensor:
    """Ids that name the same token string in both tokenizers (padding rows excluded)."""
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    shared = sorted(i for token, i in vocab_a.items() if vocab_b.get(token) == i and i < rows_a and i < rows_b)
    return torch.tensor(shared, dtype=torch.long)
