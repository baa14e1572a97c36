"""A quantized GGUF rewritten with f32 weights, so llama.cpp computes what transformers computes.

Measured here: llama.cpp on the embedded Q4_1 SmolLM2 ranks "L" (24.74) over "The" (24.65) as the
first answer token to "What is the capital of France?" — the prompt was right (same template,
same token ids); llama.cpp's Q4_1 x Q8 dot products, not the template, flipped a near tie.
transformers dequantizes the same GGUF to f32 and answers "The capital of France is Paris.";
llama.cpp on the dequantized copy does too. The copy is made once, tensor by tensor, in the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KEEP_AS_IS = {0, 1}  # GGMLQuantizationType F32, F16: already exact


def full_precision_gguf(gguf_path: Path, cache: Path | None = None) -> Path:
    """Path of an f32 copy of `gguf_path` in the cache (the file itself when nothing is quantized)."""
    import gguf

    from qwenforge.cache import cache_root

    gguf_path = Path(gguf_path)
    reader = gguf.GGUFReader(str(gguf_path))
    if all(int(tensor.tensor_type) in KEEP_AS_IS for tensor in reader.tensors):
        return gguf_path
    stat = gguf_path.stat()
    target = (cache or cache_root()) / "gguf-f32" / f"{gguf_path.stem}-{stat.st_size:x}.f32.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_suffix(".tmp")
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(temp), architecture, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name == gguf.Keys.General.FILE_TYPE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        nbytes = int(np.prod(shape)) * 4
        writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        writer.write_tensor_data(np.ascontiguousarray(values.reshape(tuple(int(n) for n in reversed(tensor.shape)))))
    writer.close()
    temp.rename(target)
    return target
