"""convert: a Qwen2/Qwen2.5 (or Llama-shaped) checkpoint rebuilt in the Qwen3 architecture.

    qwenforge convert SOURCE OUT [--donor QWEN3_DONOR] [--keep-bias] [--qk-norm calibrated]

Modules in the order a conversion runs: preflight, vocab, tensor_map, qk_norm, run (the verb), provenance.
"""

from qwenforge.convert.run import ConvertOptions, convert

__all__ = ["ConvertOptions", "convert"]
