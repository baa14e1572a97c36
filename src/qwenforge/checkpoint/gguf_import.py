"""`qwenforge import-gguf FILE OUT`: a GGUF file (llama, qwen2, qwen3) into a Hugging Face checkpoint folder.

GGUF is an import format only. transformers dequantizes the weights; a GGUF-loaded model refuses
`save_pretrained`, so the state dict is written by qwenforge's own shard writer next to the
config, tokenizer (with the GGUF's chat template) and generation config.
"""

from __future__ import annotations

from pathlib import Path

from qwenforge.errors import QwenforgeError

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def gguf_metadata(path: Path) -> dict:
    """`{"config": transformers config dict, "metadata": GGUF keys, "tensors": names}`, without reading tensor data.

    transformers' fast header reader (vocabulary arrays skipped: 0.1 s) and its own GGUF -> config key
    table; its legacy reader, which AutoConfig/AutoTokenizer/from_pretrained each run for qwen2 and
    llama files, walks the whole 151k-token vocabulary into numpy objects (16-20 s per call).
    """
    path = Path(path)
    if not path.is_file():
        raise QwenforgeError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise QwenforgeError(f"{path}: not a GGUF file (bad magic bytes); check the download")
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, names = read_gguf_metadata(str(path))
    except Exception as error:  # struct.error / ValueError on truncated or garbled headers
        raise QwenforgeError(f"{path}: corrupt or truncated GGUF ({type(error).__name__}: {error}); re-download it") from error
    architecture = metadata["general.architecture"]
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise QwenforgeError(
            f"{path}: GGUF architecture {architecture!r} is not supported; qwenforge imports {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    config = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {}))
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            config[renamed] = value
    config["tie_word_embeddings"] = "output.weight" not in names
    config.setdefault("vocab_size", metadata.get("tokenizer.ggml.tokens"))  # the fast reader leaves the array as its length
    head_dim = metadata.get(f"{architecture}.attention.key_length")
    if head_dim:  # transformers' GGUF config table drops key_length: Qwen3's head_dim is not hidden/heads
        config["head_dim"] = int(head_dim)
    return {"config": config, "metadata": metadata, "tensors": names}


def _tokenizer(path: Path, config, metadata: dict):
    """The GGUF's tokenizer, built by transformers' GGUF converter from one fast header read."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    try:
        tokenizer_class = TOKENIZER_MAPPING[type(config)] or PreTrainedTokenizerFast
    except KeyError:
        tokenizer_class = PreTrainedTokenizerFast
    tokenizer = tokenizer_class.from_pretrained(str(path.parent), gguf_file=path.name)
    if metadata.get("tokenizer.chat_template"):
        tokenizer.chat_template = metadata["tokenizer.chat_template"]
    return tokenizer


def _dequantized_state(path: Path, config, config_dict: dict, dtype, progress=None) -> dict:
    """HF-named, dequantized tensors: gguf-py's reference dequantizers over a memory map, named by
    transformers' GGUF name map and tensor processors (Llama's q/k un-permutation)."""
    from math import prod

    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    # transformers' header reader (its GgufHeader refuses Q5_0, which the embedded file holds), gguf-py's block sizes
    blob = _mapped(str(path))
    metadata, count, pos = _read_metadata(blob, str(path))
    entries, pos = _read_tensor_table(blob, count, pos)
    alignment = metadata.get("general.alignment", 32)
    data_start = (pos + alignment - 1) // alignment * alignment
    blocks = [GGML_QUANT_SIZES[GGMLQuantizationType(kind)] for _, _, kind, _ in entries]  # (elements, bytes) per block
    sizes = [prod(shape[:-1]) * (shape[-1] // elements) * nbytes for (_, shape, _, _), (elements, nbytes) in zip(entries, blocks)]
    end = max((data_start + offset + size for (_, _, _, offset), size in zip(entries, sizes)), default=data_start)
    if end > len(blob):
        raise QwenforgeError(f"{path}: truncated GGUF ({len(blob):,} bytes, its tensors end at {end:,}); re-download it")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(metadata["general.architecture"], TensorProcessor)(config=config_dict)
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    state, parsed = {}, {"tensors": {}, "config": config_dict}
    for (name, shape, ggml_type, offset), size in zip(entries, sizes):
        start = data_start + offset
        raw = np.asarray(blob[start : start + size]).reshape(*shape[:-1], size // max(prod(shape[:-1]), 1))
        result = processor.process(weights=dequantize(raw, GGMLQuantizationType(ggml_type)), name=name, tensor_key_mapping=mapping, parsed_parameters=parsed)
        if result.name in mapping:
            weights = result.weights if result.weights.flags.writeable else result.weights.copy()  # F32 tensors are views of the map
            state[mapping[result.name]] = torch.from_numpy(np.ascontiguousarray(weights)).to(dtype)
        if progress is not None:
            progress()
    missing = set(skeleton.state_dict()) - set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise QwenforgeError(f"{path}: the GGUF lacks tensors the {config.model_type} model needs: {sorted(missing)[:3]}; re-download it")
    return state


def import_gguf(gguf_path: Path, out: Path, dtype: str = "float32", force: bool = False, progress=None) -> Path:
    """Write an HF checkpoint folder for a GGUF file; returns `out`. Output appears only when complete."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from qwenforge.checkpoint.dtypes import weight_dtype
    from qwenforge.checkpoint.folder import atomic_output, read_json, write_json
    from qwenforge.checkpoint.safetensors_io import write_state_dict

    gguf_path = Path(gguf_path)
    torch_dtype = getattr(torch, weight_dtype(dtype))
    parsed = gguf_metadata(gguf_path)
    with atomic_output(out, force=force) as temp:
        config_dict = {k: v for k, v in parsed["config"].items() if k != "_model_name_or_path"}
        config = AutoConfig.for_model(**config_dict)
        tokenizer = _tokenizer(gguf_path, config, parsed["metadata"])
        state = _dequantized_state(gguf_path, config, config_dict, torch_dtype, progress)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config.dtype = torch_dtype
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(temp)
        # Stock tools (llama.cpp's converter, mergekit, vLLM) pick the model class from `architectures`.
        clean = read_json(temp / "config.json")
        clean["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[config.model_type]]
        write_json(temp / "config.json", clean)
        write_state_dict(temp, state)
        tokenizer.save_pretrained(temp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(temp)
        del state
    return Path(out)
