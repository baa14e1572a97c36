"""`qwenforge export MODEL OUT.gguf`: a checkpoint folder as one GGUF file for llama.cpp, Ollama, LM Studio.

Plan, then write: each tensor gets its GGUF name (gguf-py's tensor map) and type (llama.cpp's
rules for the chosen file type), then the tensors stream one at a time from the memory-mapped
shards into the file, so memory stays at the largest tensor. The metadata follows llama.cpp's
convert_hf_to_gguf.py (hyperparameters, rope scaling, the gpt2-style tokenizer with its
pre-tokenizer, special tokens, chat template) plus what qwenforge did (`qwenforge.*` keys).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from qwenforge import __version__
from qwenforge.checkpoint.dtypes import to_float32
from qwenforge.checkpoint.folder import read_config
from qwenforge.checkpoint.mapped_reader import MappedReader
from qwenforge.errors import QwenforgeError

# --type -> (llama.cpp file type, default tensor type)
EXPORT_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
}
NEEDS_LLAMA_CPP = ("q4_k_m",)  # gguf-py only dequantizes K-quants: llama.cpp's quantizer does them
ARCHITECTURES = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "llama": gguf.MODEL_ARCH.LLAMA}
# llama.cpp names pre-tokenizers by the sha256 of the token ids of a probe text (convert_hf_to_gguf.py,
# get_vocab_base_pre); both hashes are the Qwen byte-level BPE (Qwen1.5..Qwen3), pre-tokenizer "qwen2".
PROBE_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}
# Below this, a weight matrix's values (and fp16 block scales, max/127) fall into fp16's subnormal
# range: 'heal --method linearize' leaves q/k projections at 2e-7..5e-7 of their size (DESIGN.md).
SMALLEST_HALF_SAFE = 1e-3
CHUNK_VALUES = 1 << 24  # float32 values converted at a time: 64 MB


@dataclass(frozen=True)
class TensorPlan:
    source: str  # name in the checkpoint
    target: str  # name in the GGUF file
    shape: tuple[int, ...]  # numpy order (GGUF stores it reversed)
    qtype: Q

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the attn_v/ffn_down layers that Q4_K_M keeps at Q6_K (llama-quant.cpp)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _fits(qtype: Q, columns: int) -> bool:
    return columns % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def tensor_type(target: str, shape: tuple[int, ...], export_type: str, layers: int, tied: bool) -> Q:
    """The GGUF type of one tensor: 1-D tensors and norms stay F32, as in llama.cpp."""
    default = EXPORT_TYPES[export_type][1]
    if len(shape) < 2 or not target.endswith(".weight") or default in (Q.F32, Q.F16, Q.BF16):
        return Q.F32 if len(shape) < 2 else default
    columns = shape[-1]
    is_output = target == "output.weight" or (tied and target == "token_embd.weight")
    layer = int(target.split(".")[1]) if target.startswith("blk.") else -1
    if export_type == "q4_k_m":
        if is_output:
            chosen = Q.Q6_K
        elif (".attn_v." in target or ".ffn_down." in target) and use_more_bits(layer, layers):
            chosen = Q.Q6_K
        else:
            chosen = Q.Q4_K
        if not _fits(chosen, columns):  # llama.cpp's fallbacks for rows not a multiple of 256
            chosen = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}[chosen]
    elif export_type == "q4_0" and is_output:
        chosen = Q.Q8_0  # llama-quantize gives the output Q6_K; gguf-py has no K-quantizer
    else:
        chosen = default
    return chosen if _fits(chosen, columns) else Q.F16


def export_plan(reader: MappedReader, config: dict, export_type: str) -> tuple[list[TensorPlan], dict[str, str]]:
    """(tensors to write, {checkpoint tensor: why it is left out})."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise QwenforgeError(f"model_type {model_type!r} cannot be exported; qwenforge exports {', '.join(ARCHITECTURES)}")
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(ARCHITECTURES[model_type], layers)
    tied = bool(config.get("tie_word_embeddings"))
    plans, skipped = [], {}
    for name, info in reader.tensors.items():
        if name == "lm_head.weight" and tied:
            skipped[name] = "tied to the embeddings (llama.cpp reuses token_embd)"
            continue
        if name.endswith("self_attn.o_proj.bias"):
            if not reader.array(name).any():
                skipped[name] = "all zero; llama.cpp's qwen2/qwen3 loaders take no o_proj bias"
                continue
            if model_type != "llama":
                raise QwenforgeError(
                    f"{reader.folder}: {name} is not zero and llama.cpp's {model_type} loader has no o_proj bias; "
                    "export a checkpoint converted without --keep-bias, or fold the bias in first"
                )
        if name.endswith("rotary_emb.inv_freq"):
            skipped[name] = "recomputed by llama.cpp"
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise QwenforgeError(f"{reader.folder}: tensor {name} has no GGUF name for {model_type}; is this a dense Qwen/Llama checkpoint?")
        plan = TensorPlan(name, target, info.shape, tensor_type(target, info.shape, export_type, layers, tied))
        if plan.qtype not in (Q.F32, Q.BF16) and name.endswith(("q_proj.weight", "k_proj.weight")):
            refuse_underflow(reader, name, export_type)
        plans.append(plan)
    return plans, skipped


def refuse_underflow(reader: MappedReader, name: str, export_type: str) -> None:
    """One clear line for a q/k projection that fp16 (or fp16 block scales) would flush towards zero."""
    info = reader.tensors[name]
    peak = float(np.abs(to_float32(reader.array(name), info.dtype)).max())
    reader.release(name)
    if 0 < peak < SMALLEST_HALF_SAFE:
        raise QwenforgeError(
            f"{reader.folder}: {name} has max |w| {peak:.1e}; {export_type} stores it (or its block scales) in fp16, "
            "where it underflows (a 'heal --method linearize' checkpoint?); export --type f32 or bf16, or heal it another way"
        )


def _permute_for_llama(values: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k rows reordered for llama.cpp's rope layout (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return values.reshape(heads, 2, values.shape[0] // heads // 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """float32 values (rows) in the stored form of `qtype`."""
    if qtype in (Q.F32, Q.F16):
        return values.astype(np.float16 if qtype == Q.F16 else np.float32)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.BF16):
        return gguf.quants.quantize(values, qtype)
    from qwenforge.export.llama_quant import quantize_rows

    return quantize_rows(values, qtype, gguf.quants.quant_shape_to_byte_shape(values.shape, qtype)[-1])


def tensor_data(reader: MappedReader, plan: TensorPlan, config: dict) -> np.ndarray:
    """One tensor in its planned type: row chunks of float32 at a time; an f32 tensor stays the mapped bytes."""
    info = reader.tensors[plan.source]
    raw = reader.array(plan.source)
    permute = config["model_type"] == "llama" and plan.source.endswith(("q_proj.weight", "k_proj.weight"))
    if plan.qtype == Q.F32 and info.dtype == "F32" and not permute:
        return raw  # the mapped bytes as they are
    values, stored = raw, info.dtype
    if permute:
        heads = config["num_attention_heads"] if "q_proj" in plan.source else config.get("num_key_value_heads", config["num_attention_heads"])
        values, stored = _permute_for_llama(to_float32(raw, info.dtype), heads), "F32"
    if len(plan.shape) < 2:
        return encode(to_float32(values, stored), plan.qtype)
    rows_per_chunk = max(1, CHUNK_VALUES // plan.shape[-1])
    first = encode(to_float32(values[:1], stored), plan.qtype)
    out = np.empty((plan.shape[0], first.shape[-1]), dtype=first.dtype)
    for start in range(0, plan.shape[0], rows_per_chunk):
        rows = values[start : start + rows_per_chunk]
        out[start : start + len(rows)] = encode(to_float32(rows, stored), plan.qtype)
    return out


def pre_tokenizer(tokenizer, folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; only Qwen's byte-level BPE is known here."""
    digest = sha256(str(tokenizer.encode(PROBE_TEXT).ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise QwenforgeError(
            f"{folder}: the tokenizer is not Qwen's byte-level BPE (probe hash {digest[:12]}...); "
            "export it with llama.cpp's convert_hf_to_gguf.py, which knows other pre-tokenizers"
        )
    return PRE_TOKENIZERS[digest]


def vocabulary(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer) padded to the embedding rows, as convert_hf_to_gguf.py builds them."""
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise QwenforgeError(f"{folder}: no tokenizer.json; copy the model's tokenizer files into the folder")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    by_id = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise QwenforgeError(f"{folder}: the tokenizer has token id {max(by_id)} but the model only {vocab_size} embedding rows")
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, pre_tokenizer(tokenizer, folder)


def write_hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    """The architecture keys llama.cpp reads, named as convert_hf_to_gguf.py (TextModel) writes them."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):  # Qwen3: head_dim is not hidden / heads
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "linear" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn" and rope.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind not in (None, "default"):
        raise QwenforgeError(f"rope type {kind!r} has no GGUF form that qwenforge writes; qwenforge exports default, linear and yarn rope")


def provenance(folder: Path, source: str, export_type: str) -> dict[str, str]:
    """qwenforge.* keys: who wrote the file, from what, and the folder's own conversion record if any."""
    keys = {"qwenforge.version": __version__, "qwenforge.source": source, "qwenforge.type": export_type}
    for name in ("conversion_metadata.json", "qwenforge-recipe.json"):
        if (folder / name).is_file():
            keys[f"qwenforge.{name.removesuffix('.json').replace('-', '_')}"] = (folder / name).read_text()
    return keys


def _model_name(folder: Path) -> str:
    return re.sub(r"[^\w.\-]+", "-", folder.resolve().name)


def write_gguf(folder: Path, out: Path, export_type: str = "f16", source: str | None = None, progress=None) -> dict:
    """Write `folder` (a checkpoint folder) to the GGUF file `out` (already vetted by the caller)."""
    folder = Path(folder)
    config = read_config(folder)
    reader = MappedReader(folder)
    plans, skipped = export_plan(reader, config, export_type)
    tokens, types, pre = vocabulary(folder, config["vocab_size"])
    arch = gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config["model_type"]]]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_name(_model_name(folder))
    writer.add_file_type(EXPORT_TYPES[export_type][0])
    if export_type not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", False)  # Qwen adds no BOS; say so, as llama.cpp's Qwen GGUFs do
    special.add_to_gguf(writer, quiet=True)
    for key, value in provenance(folder, source or str(folder.resolve()), export_type).items():
        writer.add_string(key, value)
    for plan in plans:
        writer.add_tensor_info(plan.target, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
    writer.write_header_to_file(path=Path(out))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, plan in enumerate(plans):
        writer.write_tensor_data(tensor_data(reader, plan, config))
        reader.release(plan.source)
        if progress:
            progress(index + 1, len(plans), plan.target)
    writer.close()
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype.name] = counts.get(plan.qtype.name, 0) + 1
    return {"tensors": len(plans), "types": counts, "skipped": skipped, "architecture": arch}


def _temporary_beside(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.part")


def export(model: Path, out: Path, export_type: str = "f16", base: Path | None = None, force: bool = False, progress=None) -> dict:
    """Export a checkpoint folder, or a PEFT adapter merged into its base, to `out` (a .gguf file) and
    an Ollama Modelfile beside it. The file appears only when complete."""
    from qwenforge.export.adapter import base_of, is_adapter, merged_adapter
    from qwenforge.export.ollama import modelfile_for

    model, out = Path(model), Path(out)
    if export_type not in EXPORT_TYPES:
        raise QwenforgeError(f"--type {export_type}: choose one of {', '.join(EXPORT_TYPES)}")
    if export_type in NEEDS_LLAMA_CPP:
        from qwenforge.export.llama_quant import _quantize_chunk

        _quantize_chunk()  # refuse before any work when llama.cpp's quantizer is absent
    if out.suffix != ".gguf":
        raise QwenforgeError(f"{out}: name the output file *.gguf")
    modelfile = out.with_suffix(".Modelfile")
    for path in (out, modelfile):
        if path.exists() and not force:
            raise QwenforgeError(f"{path}: already exists; choose another output or pass --force to replace it")
    if not model.exists():
        raise QwenforgeError(f"{model}: no such folder; give a checkpoint folder or a PEFT adapter folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = _temporary_beside(out)
    try:
        if is_adapter(model):
            base = base_of(model, base)
            with merged_adapter(model, base, out.parent) as merged:
                source = f"{model.resolve()} (PEFT adapter) merged into {base.resolve()}"
                info = write_gguf(merged, temp, export_type, source=source, progress=progress)
                text = modelfile_for(merged, out.name)
        else:
            info = write_gguf(model, temp, export_type, progress=progress)
            text = modelfile_for(model, out.name)
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    modelfile.write_text(text)
    name = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower())
    return {**info, "output": str(out), "modelfile": str(modelfile), "ollama": f"ollama create {name} -f {modelfile}"}
