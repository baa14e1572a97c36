"""The user's own files (texts, JSONL, YAML, outputs) read and written with one-line errors.

A missing file, a folder where a file belongs, bytes that are not UTF-8 or a place that cannot be
written each become a QwenforgeError naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwenforge.errors import QwenforgeError


def read_text(path: Path, what: str = "text file", allow_empty: bool = False) -> str:
    """The UTF-8 text of `path`; `what` names the file's role in the message (e.g. "input file")."""
    path = Path(path)
    if not path.exists():
        raise QwenforgeError(f"{path}: {what} not found")
    if path.is_dir():
        raise QwenforgeError(f"{path}: is a folder; give a {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise QwenforgeError(f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); save the {what} as UTF-8") from None
    except OSError as error:
        raise QwenforgeError(f"{path}: cannot read the {what} ({error.strerror})") from None
    if not allow_empty and not text.strip():
        raise QwenforgeError(f"{path}: the {what} is empty")
    return text


def default_text(name: str) -> Path:
    """A text shipped with qwenforge: calibration.txt (fitting, healing) or heldout.txt (evaluation)."""
    path = Path(__file__).parent / "data" / name
    if not path.exists():
        raise QwenforgeError(f"no packaged {name}; pass the text with --text/--heldout")
    return path


def check_writable(path: Path, what: str = "output file") -> None:
    """Refuse, before any work, an output file that is a folder or that cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise QwenforgeError(f"{path}: is a folder; give a file name for the {what}")
    if path.exists():
        writable = os.access(path, os.W_OK)
    else:  # it will be created in its nearest existing ancestor (folders on the way are made)
        folder = next(parent for parent in path.absolute().parents if parent.exists())
        writable = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise QwenforgeError(f"{path}: cannot write the {what} there (no permission, or a file where a folder should be); choose another path")


def write_text(path: Path, text: str, what: str = "file") -> None:
    """Write `text` to `path` (UTF-8), turning an unwritable place into one line."""
    path = Path(path)
    try:
        path.write_text(text, encoding="utf-8")
    except IsADirectoryError:
        raise QwenforgeError(f"{path}: is a folder; give a file name for the {what}") from None
    except OSError as error:
        raise QwenforgeError(f"{path}: cannot write the {what} ({error.strerror}); choose another path") from None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative spellings included)."""
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(a).exists() and Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False
