"""Pre-flight checks, before any tensor is read or written.

Incompatible facts raise `QwenforgeError` (one line naming the file and the fix). Risky ones
come back as warnings that go into the metadata; `strict` turns the first into an error.
"""

from __future__ import annotations

from pathlib import Path

from qwenforge.arch.spec import ModelSpec
from qwenforge.errors import QwenforgeError

SOURCE_FAMILIES = ("qwen2", "llama")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


def check_source(spec: ModelSpec, folder: Path) -> None:
    if spec.family == "qwen3":
        raise QwenforgeError(f"{folder}: already a Qwen3 checkpoint; nothing to convert")
    if spec.family not in SOURCE_FAMILIES:
        raise QwenforgeError(f"{folder}: a {spec.family} model; convert takes Qwen2/Qwen2.5 or Llama-shaped sources")
    if spec.mlp_bias:
        raise QwenforgeError(f"{folder}: mlp_bias=True, which Qwen3's MLP cannot hold; this model cannot be converted")
    if spec.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise QwenforgeError(f"{folder}: hidden_act={spec.hidden_act!r} is not a Qwen-family activation; cannot convert")


def check_donor(source: ModelSpec, donor: ModelSpec, folder: Path, qk_norm: str) -> list[dict]:
    """Donor facts: a Qwen3 model when its q/k-norm is taken (--qk-norm donor, the default with a donor; equal
    head_dim, another depth maps by relative depth); with --qk-norm calibrated or ones the donor gives only its
    tokenizer and the rows new tokens are projected from, so any family the converter reads will do."""
    if donor.family != "qwen3" and (qk_norm == "donor" or donor.family not in SOURCE_FAMILIES):
        raise QwenforgeError(
            f"{folder}: donor is a {donor.family} model; a donor must be a Qwen3 checkpoint (its q/k-norm and tokenizer are used), "
            "or, with --qk-norm calibrated, a model whose tokenizer and rows are wanted"
        )
    if qk_norm == "donor":
        if donor.head_dim != source.head_dim:
            raise QwenforgeError(
                f"{folder}: donor head_dim {donor.head_dim} differs from the source's {source.head_dim}; "
                "--qk-norm donor needs equal head_dim (use --qk-norm calibrated)"
            )
    warnings = []

    def risk(code: str, message: str) -> None:
        warnings.append({"code": code, "message": message})

    if donor.rope_theta != source.rope_theta or donor.rope_scaling != source.rope_scaling:
        risk(
            "rope-differs",
            f"rope_theta {source.rope_theta:g} and the sliding-window settings are kept from the source; the donor uses "
            f"rope_theta {donor.rope_theta:g}: long-context behaviour follows the source, not the donor",
        )
    if donor.max_positions != source.max_positions:
        risk("context-differs", f"max_position_embeddings {source.max_positions} kept from the source (donor: {donor.max_positions})")
    if donor.rms_norm_eps != source.rms_norm_eps:
        risk("rms-eps-differs", f"rms_norm_eps {source.rms_norm_eps:g} kept from the source; donor norm weights were trained with {donor.rms_norm_eps:g}")
    if donor.hidden_act != source.hidden_act:
        risk("activation-differs", f"hidden_act {source.hidden_act} kept from the source (donor: {donor.hidden_act})")
    if donor.tied_embeddings != source.tied_embeddings:
        risk(
            "tying-differs",
            f"tie_word_embeddings={source.tied_embeddings} kept from the source (donor: {donor.tied_embeddings}); the converter never changes it",
        )
    if donor.use_sliding_window != source.use_sliding_window:
        risk("sliding-window-differs", f"use_sliding_window={source.use_sliding_window} kept from the source (donor: {donor.use_sliding_window})")
    if qk_norm == "donor" and donor.layers != source.layers:
        risk("donor-depth-differs", f"the donor has {donor.layers} layers, the source {source.layers}: q/k-norm taken by relative depth (map in conversion_metadata.json)")
    if qk_norm == "donor":
        risk("donor-qk-norm", "q/k-norm weights grafted from an unrelated donor are a guess; check the measured fidelity")
    return warnings


def check_options(spec: ModelSpec, donor: ModelSpec | None, qk_norm: str, new_token_init: str, keep_bias: bool) -> list[dict]:
    warnings = []
    if qk_norm == "donor" and donor is None:
        raise QwenforgeError("--qk-norm donor needs --donor DONOR; without one use calibrated or ones")
    if new_token_init == "donor-projected" and donor is None:
        raise QwenforgeError("--new-token-init donor-projected needs --donor DONOR; choose subword-calibrated, subword, mean or zero")
    if spec.use_sliding_window:
        warnings.append(
            {"code": "sliding-window-on", "message": f"source uses a sliding window of {spec.sliding_window} from layer {spec.max_window_layers}; kept as is"}
        )
    if qk_norm == "ones":
        warnings.append({"code": "qk-norm-ones", "message": "q/k-norm weights of one change every attention pattern; expect a large fidelity loss"})
    return warnings


def apply_strict(warnings: list[dict], strict: bool) -> None:
    if strict and warnings:
        first = warnings[0]
        raise QwenforgeError(f"--strict: {first['message']} [{first['code']}]; resolve it or run without --strict")
