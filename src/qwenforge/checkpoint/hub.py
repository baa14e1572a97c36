"""Models named by their Hugging Face id (`Qwen/Qwen2.5-72B-Instruct`), through huggingface_hub's own cache.

The standard cache (HF_HOME, HF_HUB_CACHE, or `cache_dir`) is used as is: a model downloaded
once, by qwenforge or any other tool, is found there; with HF_HUB_OFFLINE=1 (or no network) only
the cache is read, and a model missing from it is one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwenforge.errors import QwenforgeError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a checkpoint folder needs: config, safetensors shards, tokenizer and generation config (no .bin/.pth/.gguf copies).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def is_hub_id(model: str) -> bool:
    """"Org/Name" that is not a local path."""
    return bool(HUB_ID.match(model)) and not Path(model).exists() and not model.endswith((".json", ".gguf"))


def hub_download(repo_id: str, filename: str | None = None, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """One file of the model (`filename`), or its checkpoint folder, from the cache; what is missing is downloaded when online."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    named = f"{repo_id}@{revision}" if revision else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        raise QwenforgeError(
            f"{named}: no local folder of that name, and {filename or 'the model'} is not in the Hugging Face cache {where} ({why});"
            f" download it once online (`hf download {repo_id}`) or set HF_HOME to a cache that has it"
        ) from None
    except RevisionNotFoundError:
        raise QwenforgeError(f"{named}: the hub has no revision {revision!r}; give a branch, tag or commit of {repo_id}") from None
    except RepositoryNotFoundError:
        raise QwenforgeError(f"{named}: no such model on the Hugging Face hub (or it is gated: run `hf auth login`)") from None
    except EntryNotFoundError:
        raise QwenforgeError(f"{named}: the model has no {filename}") from None
