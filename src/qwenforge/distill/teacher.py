"""The teacher of `heal` and `distill`: a live model or a stored top-k, behind one small interface.

Both kinds hold their training and held-out sequences (in the student's token ids) and answer
three things for the engine's loop: `batch(step)` (which sequences train at that step, the same
for a resumed run), `loss(student_logits, batch, ...)` and `evaluate(student)` (held-out figures).

- `LiveTeacher`: a model in this process; its full next-token distribution, no grad, per batch.
  A teacher of another vocabulary reads the student's text through `Vocabulary`: each student
  token becomes the teacher token of the same string, or the teacher's spelling of it in pieces
  where the teacher lacks it; the teacher's distribution after a token's last piece is compared
  with the student's at that token, on the tokens both vocabularies hold (renormalized there).
  The teacher then reads the student's split of the text, which it may not make itself: the
  report carries the share of tokens it has whole (`Vocabulary.whole_share`). Training compares
  over the teacher's whole vocabulary instead: the student's probabilities summed by the first
  piece each token spells (`Vocabulary.first_pieces`, engine.piece_divergence), so the mass of new
  tokens is held too; the held-out KL stays on the shared tokens.
- `StoredTeacher`: a `qwenforge distill capture` store, read shard by shard (at most two shards
  in memory, never the whole store); its last sequences are held out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenforge import fidelity
from qwenforge.distill import engine, store
from qwenforge.errors import QwenforgeError


# --- vocabularies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """How the student's token ids reach the teacher.

    `student_ids`/`teacher_ids`: the tokens both hold (same string), in each model's ids, the set
    KL and agreement are taken on. `to_teacher` (student id -> teacher id, -1 where the teacher
    lacks the token) is None when the student's ids go in as they are (one tokenizer).
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    to_teacher: torch.Tensor | None = None
    spell: object = None  # student id -> the teacher's ids for that token's text, [] for none (another vocabulary)
    identity: bool = False  # every row on both sides, unmasked (`distill online`: one tokenizer)

    @classmethod
    def same(cls, rows: int) -> Vocabulary:
        ids = torch.arange(rows)
        return cls(ids, ids, identity=True)

    def inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(teacher ids [B, T'], attention mask or None, position of each student token's last piece [B, T] or None)."""
        if self.to_teacher is None:
            return ids, None, None
        mapped = self.to_teacher[ids]
        if bool((mapped >= 0).all()):
            return mapped, None, None
        rows, ends = [], []
        for row in ids.tolist():
            pieces = [[int(self.to_teacher[i])] if self.to_teacher[i] >= 0 else self.spell(i) or [0] for i in row]
            lengths = torch.tensor([len(p) for p in pieces])
            rows.append([piece for token in pieces for piece in token])
            ends.append(lengths.cumsum(0) - 1)
        width = max(len(r) for r in rows)
        teacher_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(teacher_ids)
        for number, row in enumerate(rows):
            teacher_ids[number, : len(row)], mask[number, : len(row)] = torch.tensor(row), 1
        return teacher_ids, mask, torch.stack(ends)

    @functools.cached_property
    def first_pieces(self) -> torch.Tensor | None:
        """Per student id, the teacher id of the first piece it spells: a shared token its own, a new ".set"
        that of "." (-1: an id with no text, a padding row). None with one tokenizer."""
        if self.to_teacher is None:
            return None
        first = self.to_teacher.clone()
        for student_id in (first < 0).nonzero().flatten().tolist():
            first[student_id] = (self.spell(student_id) or [-1])[0]
        return first

    def whole_share(self, sequences: list[torch.Tensor]) -> float:
        """Share of the student's tokens in `sequences` that the teacher holds as one token."""
        if self.to_teacher is None:
            return 1.0
        ids = torch.cat(sequences)
        return float((self.to_teacher[ids] >= 0).float().mean())


def vocabulary(student_tokenizer, teacher_tokenizer, student_rows: int, teacher_rows: int) -> Vocabulary:
    """Tokens shared by string (below both row counts), matched as a conversion matches them
    (`convert.vocab.align`); one tokenizer (same object) keeps the student's ids."""
    from qwenforge.convert.vocab import Tokenizer, align

    if student_tokenizer is teacher_tokenizer:
        shared = fidelity.shared_ids(student_tokenizer, teacher_tokenizer, student_rows, teacher_rows)
        return Vocabulary(shared, shared)
    teacher, student = (Tokenizer(Path(t.name_or_path), t.get_vocab(), {}, {}, None) for t in (teacher_tokenizer, student_tokenizer))
    to_teacher = torch.full((max(student_rows, len(student_tokenizer)),), -1, dtype=torch.long)
    for student_id, teacher_id in align(teacher, student, max(teacher_rows, len(teacher)), max(student_rows, len(student))).shared.items():
        if student_id < student_rows and teacher_id < teacher_rows:
            to_teacher[student_id] = teacher_id
    shared = (to_teacher >= 0).nonzero().flatten()
    spellings: dict[int, list[int]] = {}

    def spell(student_id: int) -> list[int]:
        if student_id not in spellings:
            text = student_tokenizer.decode([student_id])
            spellings[student_id] = teacher_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return spellings[student_id]

    return Vocabulary(shared, to_teacher[shared], to_teacher, spell)


# --- the batch schedule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Which training sequences make the batch of each step: a function of the step alone, so a
    resumed run draws the same batches. Each epoch covers the sequences once in full batches (the
    rest wait for the next epoch), in order or shuffled block by block (a block: one store shard,
    so batches read one shard at a time). Under DDP every rank takes its slice of one global batch."""

    count: int
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    blocks: tuple[int, ...] = ()  # sizes of the shards the sequences lie in (their sum is at least `count`)

    def per_epoch(self, world: int = 1) -> int:
        return max(1, self.count // (self.batch_size * world))

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.count)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        starts, parts = 0, []
        for size in self.blocks or (self.count,):
            size = min(size, self.count - starts)
            if size > 0:
                parts.append(starts + torch.randperm(size, generator=generator))
            starts += size
        shuffled = torch.randperm(len(parts), generator=generator).tolist()
        return torch.cat([parts[i] for i in shuffled])

    def positions(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        epoch, number = divmod(step, self.per_epoch(world))
        size = self.batch_size * world
        chosen = self.order(epoch)[number * size : (number + 1) * size]
        return chosen[rank * self.batch_size : (rank + 1) * self.batch_size].tolist()


@dataclass
class Batch:
    """Student ids [B, L+1] and, from a stored teacher, its top-k entries for them."""

    ids: torch.Tensor
    topk: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device) -> Batch:
        topk = None if self.topk is None else tuple(t.to(device) for t in self.topk)
        return Batch(self.ids.to(device), topk)


# --- a live teacher ------------------------------------------------------------------------------


class LiveTeacher:
    """A teacher model in this process, evaluated on the student's token ids (see the module docstring)."""

    def __init__(self, model, vocabulary: Vocabulary, train: list[torch.Tensor], heldout: list[torch.Tensor], heldout_bytes: list[int], schedule: Schedule):
        self.model, self.vocabulary, self.schedule = model, vocabulary, schedule
        self.train = [s for s in train if len(s) == len(train[0])]
        self.heldout, self.heldout_bytes = heldout, heldout_bytes
        self.heldout_logprobs, self.heldout_nll = self._heldout_targets()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's next-token logits [B, T, V_teacher] after each student token of `ids` [B, T] (no grad)."""
        teacher_ids, mask, ends = self.vocabulary.inputs(ids)
        with torch.no_grad():
            logits = self.model(teacher_ids, attention_mask=mask).logits
        if ends is None:
            return logits
        return logits.gather(1, ends[..., None].expand(-1, -1, logits.shape[-1]))

    def _heldout_targets(self) -> tuple[list[torch.Tensor], float]:
        """Per held-out sequence the teacher's full log-probabilities after each predicting token, and its NLL
        of the predicted text (summed over its own input stream: pieces included), computed once."""
        logprobs, nll = [], 0.0
        with torch.no_grad():
            for ids in self.heldout:
                teacher_ids, mask, ends = self.vocabulary.inputs(ids[None])
                full = F.log_softmax(self.model(teacher_ids, attention_mask=mask).logits[0].float(), -1)
                first = 0 if ends is None else int(ends[0, 0])
                stream = teacher_ids[0, first + 1 :]
                nll -= float(full[first : first + len(stream)].gather(-1, stream[:, None]).sum())
                logprobs.append(full[:-1] if ends is None else full[ends[0, :-1]])
        return logprobs, nll

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        return Batch(torch.stack([self.train[i] for i in self.schedule.positions(step, rank, world)]))

    def loss(self, student_logits: torch.Tensor, batch: Batch, kind: str, temperature: float, ce_weight: float = 0.0) -> torch.Tensor:
        teacher_logits = self.logits(batch.ids[:, :-1]) if ce_weight < 1 else None
        vocabulary = self.vocabulary
        options = {"kind": kind, "temperature": temperature, "ce_weight": ce_weight}
        if vocabulary.first_pieces is not None:  # another vocabulary: over the teacher's pieces
            return engine.distillation_loss(student_logits, batch.ids[:, 1:], teacher_logits=teacher_logits, student_pieces=vocabulary.first_pieces, **options)
        if teacher_logits is not None and not vocabulary.identity:
            teacher_logits = teacher_logits[..., vocabulary.teacher_ids]
        student_ids = None if vocabulary.identity else vocabulary.student_ids
        return engine.distillation_loss(student_logits, batch.ids[:, 1:], teacher_logits=teacher_logits, student_ids=student_ids, **options)

    def evaluate(self, student) -> dict:
        """Held-out KL(teacher||student) and top-1 agreement on the shared tokens, bits per byte and perplexity."""
        figures = fidelity.Fidelity()
        vocabulary = self.vocabulary
        shared = None if vocabulary.identity else vocabulary.student_ids
        teacher_shared = None if vocabulary.identity else vocabulary.teacher_ids
        was_training = student.training
        student.eval()
        with torch.no_grad():
            for ids, teacher, nbytes in zip(self.heldout, self.heldout_logprobs, self.heldout_bytes):
                figures.add(student(ids[None]).logits[0, :-1], teacher, ids[1:], nbytes, shared, teacher_shared)
        student.train(was_training)
        figures.teacher_nll = self.heldout_nll
        return figures.summary()


# --- a stored teacher ----------------------------------------------------------------------------


class StoredTeacher:
    """A logit store read shard by shard: the last `heldout` sequences held out, the first `train_count` train.

    `index` is `store.open_store`'s (mapped to the student's ids when it was captured with another
    tokenizer). `shared` (student ids with a teacher counterpart, after a transplant) keeps the loss
    and the figures to those ids; stored entries outside them join the tail.
    """

    def __init__(self, folder: Path, index: dict, heldout: int, schedule: Schedule, tokenizer, *, teacher_rows: int | None = None, shared: torch.Tensor | None = None):
        self.folder, self.index, self.schedule = Path(folder), index, schedule
        self.sizes = [shard["sequences"] for shard in index["shards"]]
        self.total = sum(self.sizes)
        self.teacher_rows, self.shared = teacher_rows, shared
        self._cache: dict[int, tuple] = {}
        held = self.rows(range(self.total - heldout, self.total))
        self.heldout = list(zip(*held))  # (ids, indices, log-probs) per held-out sequence
        self.heldout_bytes = fidelity.byte_counts(tokenizer, [ids for ids, _, _ in self.heldout])

    @property
    def sequence_length(self) -> int:
        return self.index["sequence_length"]

    def _shard(self, number: int) -> tuple:
        if number not in self._cache:
            if len(self._cache) >= 2:  # a batch spans at most two shards: keep the last two
                self._cache.pop(next(iter(self._cache)))
            self._cache[number] = store.read_shard(self.folder, self.index, number)
        return self._cache[number]

    def rows(self, positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, indices, log-probs) of the sequences at `positions` (store order), reading only their shards."""
        positions = torch.as_tensor(list(positions), dtype=torch.long)
        bounds = torch.tensor([0, *self.sizes]).cumsum(0)
        numbers = torch.searchsorted(bounds, positions, right=True) - 1
        parts = []
        for position, number in zip(positions.tolist(), numbers.tolist()):
            ids, indices, values = self._shard(number)
            offset = position - int(bounds[number])
            parts.append((ids[offset], indices[offset], values[offset]))
        return tuple(torch.stack(column) for column in zip(*parts))

    def first_ids(self, count: int) -> list[torch.Tensor]:
        return list(self.rows(range(min(count, self.schedule.count)))[0])

    def batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        ids, indices, values = self.rows(self.schedule.positions(step, rank, world))
        return Batch(ids, (indices, values))

    def _shared_mask(self, rows: int, device) -> torch.Tensor:
        mask = torch.zeros(rows, dtype=torch.bool, device=device)
        mask[self.shared] = True
        return mask

    def loss(self, student_logits: torch.Tensor, batch: Batch, kind: str, temperature: float, ce_weight: float = 0.0) -> torch.Tensor:
        indices, values = batch.topk
        if self.shared is not None:
            rows = student_logits.shape[-1]
            indices, values = store.store_targets(indices, values, self.shared.to(indices.device), self.teacher_rows or rows, rows)
            student_logits = store.shared_logits(student_logits, self._shared_mask(rows, student_logits.device))
        return engine.distillation_loss(student_logits, batch.ids[:, 1:], teacher_topk=(indices, values), kind=kind, temperature=temperature, ce_weight=ce_weight)

    def evaluate(self, student) -> dict:
        ids, indices, values = zip(*self.heldout)
        return store.store_fidelity(student, ids, indices, values, self.heldout_bytes, self.teacher_rows, self.shared)


def heldout_count(total: int, sequence_length: int, tokens: int) -> int:
    """Sequences of a store holding `tokens` held-out tokens (at least one)."""
    return min(total, max(1, math.ceil(tokens / sequence_length)))


def check_heldout(folder: Path, total: int, heldout: int, sequence_length: int, what: str) -> None:
    if total <= heldout:
        raise QwenforgeError(f"{folder}: {total} sequences of {sequence_length} tokens; {what} holds out the last {heldout} and trains on the rest: capture more text")
