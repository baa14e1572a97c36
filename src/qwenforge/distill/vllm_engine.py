"""`distill capture --engine vllm`: the teacher's top-k prompt log-probabilities from vLLM.

The way a teacher too large for one process is run (a 235B MoE on its own GPUs, tensor
parallel). vLLM returns, per request, `RequestOutput.prompt_logprobs`: a list over the prompt's
positions, None for the first token, then a dict token id -> Logprob(logprob, rank, ...) holding
the top `prompt_logprobs` tokens plus the prompt's own next token when it ranks lower. Entry t is
the distribution of token t given tokens < t, i.e. the transformers engine's position t - 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenforge.checkpoint.folder import read_config
from qwenforge.errors import QwenforgeError


def prompt_logprobs_to_topk(prompt_logprobs: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's prompt_logprobs (L+1 entries) -> (indices [L, k], log-probs [L, k]), highest first."""
    rows = prompt_logprobs[1:]
    indices = torch.empty(len(rows), k, dtype=torch.long)
    values = torch.empty(len(rows), k, dtype=torch.float32)
    for position, entry in enumerate(rows):
        if entry is None or len(entry) < k:
            raise QwenforgeError(f"vLLM returned {0 if entry is None else len(entry)} log-probabilities at prompt position {position + 1}, fewer than --k {k}")
        best = sorted(entry.items(), key=lambda item: -item[1].logprob)[:k]
        indices[position] = torch.tensor([token for token, _ in best])
        values[position] = torch.tensor([logprob.logprob for _, logprob in best])
    return indices, values


def vllm_teacher(teacher_dir: Path, k: int, prompt_length: int, tensor_parallel: int = 1):
    """(vocab size, top_k(ids [S, L+1], k)) backed by a vLLM engine over `teacher_dir`."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise QwenforgeError("--engine vllm: vLLM is not installed; pip install vllm (GPU machine) or use --engine transformers") from error
    config = read_config(teacher_dir)
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    llm = LLM(model=str(teacher_dir), tensor_parallel_size=tensor_parallel, max_logprobs=k, max_model_len=prompt_length + 1)
    params = SamplingParams(prompt_logprobs=k, max_tokens=1, temperature=1.0)

    def top_k(ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = llm.generate([{"prompt_token_ids": row.tolist()} for row in ids], params, use_tqdm=False)
        pairs = [prompt_logprobs_to_topk(output.prompt_logprobs, k) for output in outputs]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    return vocab_size, top_k
