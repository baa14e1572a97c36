"""Vocabulary transplant: embedding and head rows re-indexed to a target tokenizer by token string.

Tokens are matched by their string, never by id. Shared tokens keep the source's vectors; new
tokens get vectors from a chosen method (subword: the mean of the source rows of the token's pieces,
the pieces being the source's own split of the bytes the token stands for; subword-calibrated: the
same plus one fitted shift of the new tokens' head logits, `new_token_offset`); padding rows
(beyond the tokenizer) get the mean of an evenly spaced sample of the real rows (`padding_sample`), so a padding id's logit is the mean
logit of those tokens: strictly below the maximum and, on real text, far below any top-k (a zero
row would score 0, which can beat every real token). A sample, not every row: reading the whole
embedding matrix a second time only to average it cost more than copying it.
The row arithmetic is numpy on the stored values (checkpoint/dtypes.py), so a transplant needs
no torch (subword-calibrated runs the source once on the calibration text). Memory: new rows and samples of rows; shared rows are copied by the kernel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from qwenforge.checkpoint.dtypes import from_float32, to_float32
from qwenforge.errors import QwenforgeError

NEW_TOKEN_METHODS = ("donor-projected", "subword-calibrated", "subword", "mean", "zero")
PROJECTION_SAMPLE_ROWS = 4096  # plus twice the widest matrix: enough rows for a well-posed least squares
PADDING_SAMPLE_ROWS = 4096


@dataclass(frozen=True)
class Tokenizer:
    """What the transplant needs from a tokenizer folder: token strings by id and its chat template."""

    folder: Path
    vocab: dict[str, int]  # token string -> id, added tokens included
    special: dict[str, bool]  # added token string -> declared special
    declared: dict[str, str]  # role (eos_token, pad_token, ...) -> token string
    chat_template: str | None
    byte_level: bool = False  # GPT-2 style byte-level BPE: token strings spell bytes (Ġ is a space byte)

    def __len__(self) -> int:
        return max(self.vocab.values()) + 1

    @cached_property
    def by_id(self) -> dict[int, str]:
        """id -> token string, built once (alignment and id remapping each need it)."""
        return {i: s for s, i in self.vocab.items()}


def _read_vocabulary(raw: bytes) -> dict:
    """tokenizer.json without its BPE merges, which are most of the file and unused here: the merges
    come last in files that `tokenizers` writes, so the bytes before them, closed, are the rest
    (a fifth of the parsing time for Qwen's). Anything else is parsed whole."""
    head, found, _ = raw.rpartition(b'"merges":')
    if found:
        try:
            data = json.loads(head.rstrip().removesuffix(b",") + b"}}")
            if isinstance(data.get("model", {}).get("vocab"), dict) and "added_tokens" in data:
                return data
        except ValueError:
            pass
    return json.loads(raw)


def load_tokenizer(folder: Path) -> Tokenizer:
    """Read a tokenizer folder (tokenizer.json + tokenizer_config.json) without transformers."""
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.exists():
        raise QwenforgeError(f"{folder}: no tokenizer.json; give a folder with a fast tokenizer (--tokenizer)")
    try:
        data = _read_vocabulary(file.read_bytes())
        vocab = dict(data["model"]["vocab"])
        special = {}
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            special[added["content"]] = bool(added.get("special", False))
    except (ValueError, KeyError, TypeError) as error:
        raise QwenforgeError(f"{file}: not a readable tokenizer.json ({error}); re-export the tokenizer") from error
    config = {}
    if (folder / "tokenizer_config.json").exists():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    declared = {}
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(role)
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            declared[role] = value
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: check them all
        template = "\n".join(item.get("template", "") for item in template)
    return Tokenizer(folder, vocab, special, declared, template, "ByteLevel" in json.dumps(data.get("decoder")))


def template_tokens(template: str | None) -> list[str]:
    """Special tokens a chat template writes: the `<|...|>` markers (plain tags like `<tools>` are text)."""
    return sorted(set(re.findall(r"<\|[A-Za-z0-9_]+\|>", template or "")))


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """Every token the chat template or tokenizer_config names must be a single token of the vocabulary."""
    needed = {token: "chat template" for token in template_tokens(tokenizer.chat_template)}
    needed.update({token: f"tokenizer_config {role}" for role, token in tokenizer.declared.items()})
    for token, where in needed.items():
        if token not in tokenizer.vocab:
            raise QwenforgeError(
                f"{tokenizer.folder}: the {where} uses {token} but the tokenizer has no such token; "
                "use the tokenizer that belongs to this chat template"
            )


@dataclass
class VocabMap:
    """target id -> source id for shared tokens; the rest of the tokenizer's ids are new; rows beyond are padding."""

    target_rows: int
    target_size: int  # ids below this belong to the tokenizer
    shared: dict[int, int]
    new: list[int]
    identity: bool
    new_tokens: dict[int, str] = field(default_factory=dict)

    @cached_property
    def shared_runs(self) -> list[tuple[int, int, int]]:
        """Shared ids as (target start, source start, length) runs, computed once for both matrices."""
        return runs(sorted(self.shared.items()))


def align(source: Tokenizer, target: Tokenizer, source_rows: int, target_rows: int) -> VocabMap:
    """Match target tokens to source tokens by string."""
    if len(source) > source_rows:
        raise QwenforgeError(
            f"{source.folder}: tokenizer has {len(source)} tokens but the checkpoint only {source_rows} embedding rows; "
            "this tokenizer does not belong to this checkpoint"
        )
    if len(target) > target_rows:
        raise QwenforgeError(f"{target.folder}: tokenizer has {len(target)} tokens, more than the {target_rows} output rows")
    shared, new, new_tokens = {}, [], {}
    by_id = target.by_id
    if target is source:  # the source's own tokenizer: every id maps to itself (ids without a token are new)
        shared = {index: index for index in sorted(by_id)}
        new = [index for index in range(len(target)) if index not in shared]
        new_tokens = dict.fromkeys(new)
    else:
        for index in range(len(target)):
            token = by_id.get(index)
            if token is not None and token in source.vocab:
                shared[index] = source.vocab[token]
            else:
                new.append(index)
                new_tokens[index] = token
    # padding rows are reset even for the source's own tokenizer: whatever training left there may win a top-k
    identity = source_rows == target_rows == len(target) and not new and all(t == s for t, s in shared.items())
    return VocabMap(target_rows, len(target), shared, new, identity, new_tokens)


def summary(vocab_map: VocabMap, source: Tokenizer, target: Tokenizer, method: str) -> dict:
    """The vocabulary facts of a conversion, for the metadata and the model card."""
    padding = vocab_map.target_rows - vocab_map.target_size
    return {
        "tokenizer": str(target.folder),
        "source_tokens": len(source),
        "target_tokens": len(target),
        "rows": vocab_map.target_rows,
        "shared": len(vocab_map.shared),
        "new": len(vocab_map.new),
        "padding_rows": padding,
        "new_token_init": method,
        "summary": "unchanged (the source's own tokenizer)" if vocab_map.identity else (
            f"{len(vocab_map.shared)} tokens shared by string, {len(vocab_map.new)} new ({method}), "
            f"{padding} padding rows (mean of a sample of real rows)"
        ),
    }


def special_token_map(source: Tokenizer, target: Tokenizer, vocab_map: VocabMap, method: str) -> list[dict]:
    """Each added/special token of the target tokenizer, one by one: where its vectors come from."""
    rows = []
    for token, index in sorted(target.special.items(), key=lambda item: target.vocab[item[0]]):
        index = target.vocab[token]
        source_id = vocab_map.shared.get(index)
        rows.append(
            {
                "token": token,
                "target_id": index,
                "special": target.special[token],
                "source_id": source_id,
                "init": "copied from source" if source_id is not None else method,
                "in_chat_template": token in (target.chat_template or ""),
            }
        )
    return rows


def read_rows(reader, name: str, rows: list[int]) -> np.ndarray:
    """Rows of a 2-D tensor in float32, read one by one, never the whole matrix."""
    return to_float32(reader.rows(name, rows), reader.tensors[name].dtype)


def projection_sample(vocab_map: VocabMap, widest: int) -> list[int]:
    """Evenly spread chunks of shared target ids for fitting the donor -> source map."""
    shared = sorted(vocab_map.shared)
    want = min(len(shared), PROJECTION_SAMPLE_ROWS + 2 * widest)
    if want == len(shared):
        return shared
    chunks = 64
    size = max(1, want // chunks)
    step = len(shared) // chunks
    sample = []
    for c in range(chunks):
        sample.extend(shared[c * step : c * step + size])
    return sample


def fit_projection(donor_rows: np.ndarray, source_rows: np.ndarray) -> np.ndarray:
    """Least-squares linear map (with bias column) from donor space to source space on shared tokens."""
    design = np.hstack([donor_rows.astype(np.float64), np.ones((len(donor_rows), 1))])
    return np.linalg.lstsq(design, source_rows.astype(np.float64), rcond=None)[0]


def apply_projection(mapping: np.ndarray, donor_rows: np.ndarray) -> np.ndarray:
    design = np.hstack([donor_rows.astype(np.float64), np.ones((len(donor_rows), 1))])
    return (design @ mapping).astype(np.float32)


@cache
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def token_bytes(tokenizer: Tokenizer, token: str) -> bytes:
    """The bytes a token stands for: byte-level strings decoded (`Ġthe` is b" the", a lone `À` the byte 0xC0),
    SentencePiece's `▁` a space and `<0xNN>` its byte; added tokens are their literal text."""
    if tokenizer.byte_level and token not in tokenizer.special:
        decode = {c: b for b, c in byte_level_alphabet().items()}
        if all(c in decode for c in token):
            return bytes(decode[c] for c in token)
    if match := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def subword_pieces(source: Tokenizer, tokens: list[str | None], target: Tokenizer | None = None) -> list[list[int]]:
    """Each target token's pieces (source ids): the source's own split of the bytes the token stands for,
    computed once per conversion. Between byte-level vocabularies the source's BPE runs on the bytes
    directly, so a token that is part of a character (a lone UTF-8 byte) still gets its byte's row;
    otherwise the source tokenizer encodes the token's text."""
    from tokenizers import Tokenizer as FastTokenizer

    fast = FastTokenizer.from_file(str(source.folder / "tokenizer.json"))
    target = target or source
    alphabet = byte_level_alphabet()
    pieces = []
    for token in tokens:
        if not token:
            pieces.append([])
            continue
        data = token_bytes(target, token)
        if source.byte_level:
            pieces.append([piece.id for piece in fast.model.tokenize("".join(alphabet[b] for b in data))])
        else:
            pieces.append(fast.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids)
    return pieces


def subword_rows(matrix: np.ndarray, dtype: str, pieces: list[list[int]]) -> np.ndarray:
    """Mean (float32) of the source rows of each token's pieces (the mean real row for a token without pieces).

    `matrix` holds the stored values (checkpoint/dtypes.py), as a mapped reader's `array` gives them.
    """
    rows = [to_float32(matrix[ids], dtype).mean(0) if ids else mean_row(matrix, dtype, len(matrix)) for ids in pieces]
    return np.stack(rows) if rows else np.empty((0, matrix.shape[1]), dtype=np.float32)


def mean_row(matrix: np.ndarray, dtype: str, count: int, chunk: int = 8192) -> np.ndarray:
    """Mean (float32) of the first `count` rows, in chunks: never a float copy of the whole matrix."""
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, count, chunk):
        total += to_float32(matrix[start : min(start + chunk, count)], dtype).sum(0, dtype=np.float64)
    return (total / max(count, 1)).astype(np.float32)


def padding_sample(count: int, sample: int = PADDING_SAMPLE_ROWS) -> list[int]:
    """Evenly spaced ids among the first `count` real rows whose mean becomes every padding row."""
    return list(range(0, count, max(1, count // sample)))


def runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(target, source) id pairs as (target start, source start, length) runs where both step by one."""
    out: list[list[int]] = []
    for target, source in pairs:
        if out and target == out[-1][0] + out[-1][2] and source == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([target, source, 1])
    return [tuple(run) for run in out]


def transplant_parts(reader, name: str, vocab_map: VocabMap, new_rows: np.ndarray | None) -> list:
    """The output matrix `name` as ordered writer parts (`ShardedWriter.write_parts`): shared runs as
    byte spans of the source file, copied by the kernel (or, from a reader without spans, as
    slices of the matrix), new rows and padding rows as small arrays of the stored dtype. Padding
    rows are the mean of `padding_sample` of the output's real rows."""
    matrix, dtype = reader.array(name), reader.tensors[name].dtype
    span = reader.span(name) if hasattr(reader, "span") else None
    if vocab_map.identity:
        return [span if span is not None else matrix]
    row_bytes = matrix.shape[1] * matrix.dtype.itemsize
    placed: list[tuple[int, object]] = []
    for target, source, length in vocab_map.shared_runs:
        part = (span[0], span[1] + source * row_bytes, length * row_bytes) if span is not None else matrix[source : source + length]
        placed.append((target, part))
    position = {target: i for i, target in enumerate(vocab_map.new)}
    if vocab_map.new:
        stored = from_float32(new_rows, dtype)
        placed.extend((target, stored[i : i + 1]) for target, i in position.items())
    padding = vocab_map.target_rows - vocab_map.target_size

    def padding_rows() -> np.ndarray:
        sample = padding_sample(vocab_map.target_size)
        shared = read_rows(reader, name, [vocab_map.shared[t] for t in sample if t in vocab_map.shared])
        new = np.asarray([new_rows[position[t]] for t in sample if t not in vocab_map.shared], dtype=np.float32).reshape(-1, matrix.shape[1])
        mean = from_float32(np.concatenate([shared, new]).mean(0), dtype)
        return np.broadcast_to(mean, (padding, len(mean)))

    if padding:  # computed when written, after the shared rows: the kernel's copy has read them into the page cache
        placed.append((vocab_map.target_size, padding_rows))
    return [part for _, part in sorted(placed, key=lambda item: item[0])]


def new_token_rows(
    method: str,
    matrix: np.ndarray,
    dtype: str,
    source: Tokenizer,
    vocab_map: VocabMap,
    donor_projected: np.ndarray | None = None,
    pieces: list[list[int]] | None = None,
) -> np.ndarray:
    """float32 vectors of the target tokens the source lacks, by method (donor-projected rows come precomputed)."""
    count = len(vocab_map.new)
    width = matrix.shape[1]
    if count == 0:
        return np.empty((0, width), dtype=np.float32)
    if method == "zero":
        return np.zeros((count, width), dtype=np.float32)
    if method == "mean":
        return np.tile(mean_row(matrix, dtype, len(source)), (count, 1))
    if method in ("subword", "subword-calibrated"):  # calibrated: plus a head offset, added by the caller (new_token_offset)
        if pieces is None:
            pieces = subword_pieces(source, [vocab_map.new_tokens[i] for i in vocab_map.new])
        return subword_rows(matrix, dtype, pieces)
    if method == "donor-projected":
        if donor_projected is None:
            raise QwenforgeError("--new-token-init donor-projected needs --donor; choose subword-calibrated, subword, mean or zero")
        return donor_projected
    raise QwenforgeError(f"--new-token-init {method}: choose one of {', '.join(NEW_TOKEN_METHODS)}")


def source_hidden_states(source, text: str, max_tokens: int = 1024):
    """float32 [T, hidden] final hidden states (after the last norm: what the head reads) of the source
    on `text` in its own tokenization; `source` is a folder or a loaded (model, tokenizer) pair."""
    import torch

    from qwenforge.compare import load

    model, tokenizer = load(source)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
    return hidden.float().numpy()


def new_token_offset(hidden: np.ndarray, shared_head: np.ndarray, new_head: np.ndarray, new_rate: float) -> dict:
    """A shift of every new token's head logit, as a row change `offset * direction`, so that on the
    calibration text the transplanted head gives the new tokens the share of probability they have
    in the target's tokenization of that text (`new_rate`).

    Subword rows score a new token with the mean of its pieces' logits: tens of thousands of such
    guesses together take far more probability than the new tokens have (SmolLM2 -> Qwen2.5: 19% of
    the mass on calibration text against 7.8% of the tokens), so every real token is underpredicted.
    `direction` is the least-squares u with hidden @ u = 1 (final hidden states keep a near-constant
    component, so it acts as a bias the head has no slot for); the offset is found by bisection (the
    new tokens' share grows with it). Returns {"offset", "direction", "direction_spread", ...}.
    """
    hidden = hidden.astype(np.float64)
    direction = np.linalg.lstsq(hidden, np.ones(len(hidden)), rcond=None)[0]
    along = hidden @ direction

    def logsumexp(rows: np.ndarray) -> np.ndarray:
        total = np.full(len(hidden), -np.inf)
        for start in range(0, len(rows), 8192):
            logits = hidden @ rows[start : start + 8192].astype(np.float64).T
            total = np.logaddexp(total, np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1))
        return total

    shared, new = logsumexp(shared_head), logsumexp(new_head)

    def share(offset: float) -> float:
        shifted = new + offset * along
        return float(np.mean(np.exp(shifted - np.logaddexp(shared, shifted))))

    low, high = -20.0, 20.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if share(middle) > new_rate else (middle, high)
    offset = (low + high) / 2
    return {"offset": offset, "direction": direction.astype(np.float32), "direction_spread": float(along.std()),
            "new_rate": new_rate, "new_share_before": share(0.0), "calibration_tokens": len(hidden)}
