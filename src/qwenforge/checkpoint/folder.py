"""Checkpoint folders: reading their config, and writing new ones safely (temp folder, then rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from qwenforge.errors import QwenforgeError

COMPLETE_MARKER = ".qwenforge-complete"
OWNER_FILE = ".qwenforge-owner"  # pid of the run writing a temporary folder


def read_json(path: Path) -> dict:
    from qwenforge.files import read_text

    path = Path(path)
    if not path.exists():
        raise QwenforgeError(f"{path}: file not found")
    try:
        return json.loads(read_text(path, "JSON file"))
    except ValueError as error:
        raise QwenforgeError(f"{path}: malformed JSON ({error}); fix or replace the file") from error


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, with a clear error for a missing folder or file."""
    folder = Path(folder)
    if not folder.exists():
        raise QwenforgeError(f"{folder}: no such folder; give a checkpoint folder, config.json, GGUF file or preset")
    if not folder.is_dir():
        raise QwenforgeError(f"{folder}: not a folder; give a checkpoint folder (config.json, *.safetensors, tokenizer files)")
    if not (folder / "config.json").exists():
        raise QwenforgeError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise QwenforgeError(f"{folder / 'config.json'}: expected a JSON object of settings; copy the checkpoint's config.json again")
    return config


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_of(path: Path, chunk: int = 1 << 22, stop=None) -> str | None:
    """Hex sha256 of a file; None if `stop` (a threading.Event) is set before the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if stop is not None and stop.is_set():
                return None
            digest.update(block)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.tmp-OUT-*` folders left by killed runs (their owner process no longer exists)."""
    removed = []
    for temp in Path(out).parent.glob(f".tmp-{Path(out).name}-*"):
        try:
            pid = int((temp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge: no owner recorded
        if not _alive(pid):
            shutil.rmtree(temp, ignore_errors=True)
            removed.append(temp)
    return removed


def refuse_overlap(out: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is, holds or lies inside one of the inputs: replacing OUT would delete it.

    `inputs` maps a name for the message (e.g. "source") to a path (None: not given)."""
    target = Path(out).resolve()
    for role, path in inputs.items():
        if path is None:
            continue
        given = Path(path).resolve()
        if target == given or target in given.parents or given in target.parents:
            raise QwenforgeError(f"{out}: the output overlaps the {role} {path}; writing it would delete the {role}; choose an output folder elsewhere")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only when the block completes.

    An existing `out` is refused unless `force`; a failed run removes its `.tmp-*` folder, and a
    killed one (SIGKILL, power loss) leaves one that never looks complete and that the next run
    for the same `out` removes once its owner process is gone, so a restart needs no cleaning.
    """
    out = Path(out)
    if out.exists() and not force:
        raise QwenforgeError(f"{out}: already exists; choose another output or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    temp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    (temp / OWNER_FILE).write_text(f"{os.getpid()}\n")
    try:
        yield temp
        (temp / COMPLETE_MARKER).write_text("")
        if out.exists():
            old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(temp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, out)
        (out / COMPLETE_MARKER).unlink(missing_ok=True)
        (out / OWNER_FILE).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextlib.contextmanager
def trained_output(model, out: Path, tokenizer_dir: Path, report_name: str, report: dict, force: bool = False) -> Iterator[Path]:
    """`atomic_output` holding a trained model (heal, distill): its weights, the tokenizer files of
    `tokenizer_dir` and the run's report; the block adds what is the run's own (its curve)."""
    with atomic_output(out, force=force) as folder:
        model.save_pretrained(folder)
        copy_tokenizer_files(tokenizer_dir, folder)
        write_json(folder / report_name, report)
        yield folder


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer and generation files of a checkpoint folder; returns the names copied."""
    names = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "generation_config.json",
        "added_tokens.json",
    ]
    copied = []
    for name in names:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied
