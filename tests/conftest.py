"""Session fixtures: real Qwen tokenizers and tiny checkpoints built from real presets, offline.

Everything heavy is built once per session under a shared cache folder; tests never download.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the workers share the cores instead of each taking all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from qwenforge.fixtures.tiny import build_tiny_checkpoint  # noqa: E402
from qwenforge.fixtures.tokenizers import tokenizer_folder  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A folder the whole test run shares (every xdist worker): results one module measures for another."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def cache_dir(run_dir) -> Path:
    """The qwenforge cache for the test session: $QWENFORGE_CACHE when set, else a fresh temporary folder.

    Tests never write to the user's cache; the folder is exported so CLI subprocesses share it. The
    xdist workers share one folder (the parent of their own temporary folders): the embedded model
    and the tokenizers are built once per run, by whichever worker needs them first (cache.building).
    """
    from qwenforge.cache import cache_root

    if not os.environ.get("QWENFORGE_CACHE"):
        shared = run_dir / "qwenforge-cache"
        shared.mkdir(exist_ok=True)
        os.environ["QWENFORGE_CACHE"] = str(shared)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(cache_dir) -> Path:
    return tokenizer_folder("qwen2.5", cache_dir)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(cache_dir) -> Path:
    return tokenizer_folder("qwen3", cache_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    """Tiny Qwen2.5-7B-shaped model: q/k/v biases, untied head, 152,064 rows, real Qwen2.5 tokenizer."""
    return build_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    """Tiny Qwen2.5-0.5B-shaped model: tied embeddings, 151,936 rows."""
    return build_tiny_checkpoint("qwen2-tied", tmp_path_factory.mktemp("tiny") / "qwen2-tied", qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Tiny Qwen3-0.6B-shaped model: q/k-norm, tied, 151,936 rows, real Qwen3 tokenizer."""
    return build_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("tiny") / "qwen3", qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_untied(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """Tiny Qwen3-32B-shaped model (untied head): a donor for conversions."""
    return build_tiny_checkpoint("qwen3-untied", tmp_path_factory.mktemp("tiny") / "qwen3-untied", qwen3_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, qwen25_tokenizer_dir) -> Path:
    return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama", qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def embedded_model_dir(cache_dir) -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct imported from its GGUF (once per cache)."""
    from qwenforge.cache import embedded_model

    return embedded_model(cache_dir)


@pytest.fixture(scope="session")
def tiny_other_vocab(tmp_path_factory) -> Path:
    """Tiny Llama-shaped model whose byte-level BPE (2,000 tokens, trained here) splits text unlike Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qwenforge.files import default_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(default_text("calibration.txt"))], trainer)
    folder = tmp_path_factory.mktemp("other-vocab") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)
    return build_tiny_checkpoint(
        "llama", folder.parent / "model", folder, vocab_size=tokenizer.get_vocab_size(), bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
