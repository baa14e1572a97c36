"""`heal --train vocabulary`: after a transplant to another tokenizer, learn one linear map that places
every new token's row, instead of training the rows one by one.

A row trained by itself moves only when its token is in the healing text, and the held-out text's new
tokens mostly are not (code and punctuation pieces of a 151,936-token vocabulary). A map learns from
the tokens the text holds and moves all of them. Its input is what every new token has: the donor's
own row for it (a conversion with --new-token-init donor-projected; the conversion fitted the same map
by least squares on shared tokens), else the source's rows of the pieces it spells (mean, first,
last). New rows = converted rows + features @ Q, with Q from zero; shared rows never move.
benchmarks/vocab_transplant.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwenforge.checkpoint.folder import read_json
from qwenforge.checkpoint.mapped_reader import MappedReader
from qwenforge.errors import QwenforgeError


@dataclass
class RowMap:
    """One matrix's new rows as converted rows + features @ map (a tied head shares its embedding's)."""

    name: str  # the student's parameter name
    base: torch.Tensor  # the converted matrix, fixed
    ids: torch.Tensor  # the new tokens' rows
    features: torch.Tensor  # [new, width + 1], scaled so a change of 1 in `map` moves a row by at most the rows' RMS
    map: torch.nn.Parameter  # [width + 1, hidden], from zero

    def weight(self) -> torch.Tensor:
        return self.base.index_add(0, self.ids, self.features @ self.map)


def _float_rows(reader: MappedReader, name: str, ids: list[int]) -> torch.Tensor:
    from qwenforge.convert.vocab import read_rows  # the conversion's own row reader

    return torch.from_numpy(read_rows(reader, name, ids).copy())


def _matrix_name(reader: MappedReader, head: bool) -> str:
    """The folder's head matrix (its embedding where the head is tied) or its embedding."""
    if head and "lm_head.weight" in reader:
        return "lm_head.weight"
    names = [n for n in reader.names() if n.endswith("embed_tokens.weight")]
    if not names:
        raise QwenforgeError(f"{reader.folder}: no embedding matrix (*.embed_tokens.weight) to read rows from")
    return names[0]


def recorded_donor(converted: Path) -> Path | None:
    """The donor a donor-projected conversion took its new rows from, when that folder is still there."""
    metadata = Path(converted) / "conversion_metadata.json"
    if not metadata.exists():
        return None
    record = read_json(metadata)
    if record.get("vocabulary", {}).get("new_token_init") != "donor-projected":
        return None
    path = record.get("inputs", {}).get("donor", {}).get("path")
    return Path(path) if path and Path(path).is_dir() else None


def _donor_features(donor: Path, tokens: list[str], head: bool) -> torch.Tensor:
    """The donor's rows of the new tokens, by token string (zeros where the donor lacks one)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(donor).get_vocab()
    reader = MappedReader(donor)
    name = _matrix_name(reader, head)
    found = [i for i, token in enumerate(tokens) if vocab.get(token, reader.tensors[name].shape[0]) < reader.tensors[name].shape[0]]
    features = torch.zeros(len(tokens), reader.tensors[name].shape[1])
    if found:
        features[found] = _float_rows(reader, name, [vocab[tokens[i]] for i in found])
    return features


def _piece_features(teacher_dir: Path, spellings: list[list[int]], head: bool) -> torch.Tensor:
    """Per new token, the source's rows of the pieces it spells: mean, first and last, side by side."""
    reader = MappedReader(teacher_dir)
    name = _matrix_name(reader, head)
    needed = sorted({piece for pieces in spellings for piece in pieces})
    rows = _float_rows(reader, name, needed)
    where = {piece: i for i, piece in enumerate(needed)}
    features = torch.zeros(len(spellings), 3 * rows.shape[1])
    for n, pieces in enumerate(spellings):
        own = rows[[where[p] for p in pieces]]
        features[n] = torch.cat([own.mean(0), own[0], own[-1]])
    return features


def new_ids(vocabulary, rows: int, student_tokenizer, converted: Path) -> torch.Tensor:
    """The student's rows whose token the teacher lacks (padding rows past the tokenizer are never read)."""
    ids = torch.empty(0, dtype=torch.long) if vocabulary.to_teacher is None else (vocabulary.to_teacher[:rows] < 0).nonzero().flatten()
    ids = ids[ids < len(student_tokenizer)]
    if len(ids) == 0:
        raise QwenforgeError(f"{converted}: every token is also its teacher's, so no row is new; --train vocabulary heals a transplant to another tokenizer (use --train norms+qk-lora)")
    return ids


def row_maps(student, student_tokenizer, converted: Path, teacher_dir: Path, vocabulary) -> tuple[list[RowMap], dict]:
    """The maps to train (one per distinct matrix) and what the report says about them."""
    rows = student.get_input_embeddings().weight.shape[0]
    ids = new_ids(vocabulary, rows, student_tokenizer, converted)
    donor = recorded_donor(converted)
    tokens = student_tokenizer.convert_ids_to_tokens(ids.tolist())
    spellings = None if donor else [vocabulary.spell(int(i)) or [0] for i in ids]
    names = {id(p): n for n, p in student.named_parameters()}  # a tied head's matrix goes by its embedding's name
    matrices = [(student.get_input_embeddings().weight, False)]
    if student.get_output_embeddings().weight is not student.get_input_embeddings().weight:
        matrices.append((student.get_output_embeddings().weight, True))
    maps = []
    for matrix, head in matrices:
        features = _donor_features(donor, tokens, head) if donor else _piece_features(teacher_dir, spellings, head)
        features = torch.cat([features, torch.ones(len(ids), 1)], 1)
        shared = torch.ones(rows, dtype=torch.bool)
        shared[ids] = False
        rms = matrix.detach()[shared].pow(2).mean().sqrt()
        features = features * (rms / features.abs().sum(1).mean())
        maps.append(RowMap(names[id(matrix)], matrix.detach().clone(), ids, features, torch.nn.Parameter(torch.zeros(features.shape[1], matrix.shape[1]))))
    facts = {
        "new_tokens": len(ids),
        "features": f"the donor's rows of the new tokens ({donor})" if donor else "the source's rows of each new token's pieces (mean, first, last)",
        "maps": [m.name for m in maps],
    }
    return maps, facts


def forward(student, maps: list[RowMap], ids: torch.Tensor):
    """The student's output with the mapped rows (a tied head follows its embedding)."""
    return torch.func.functional_call(student, {m.name: m.weight() for m in maps}, (ids,))


def write(student, maps: list[RowMap]) -> None:
    """Put the mapped rows into the student's own matrices (for evaluation and the written checkpoint)."""
    parameters = dict(student.named_parameters())
    with torch.no_grad():
        for m in maps:
            parameters[m.name].copy_(m.weight())
