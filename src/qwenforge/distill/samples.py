"""Text sampled from the teacher itself, as more healing text (sequence-level distillation).

A packaged calibration text is a few thousand tokens; a heal that moves rows or maps over a whole
vocabulary needs more, and text a user has at hand may not look like what the model will read. The
teacher's own continuations follow its distribution (temperature 1, no top-k/top-p), so cross-entropy
on them is distillation too. Prompts are windows of the healing text, spread over it, so the samples
stay near its subjects; only the continuations are kept: the prompts are the healing text itself, and
keeping them repeated it about twelve times over (a vocabulary heal learned calibration.txt by heart,
0.16 bits/byte against the source's 0.92, and a later fine-tune on it then hurt held-out text).
The same seed gives the same samples (a resumed heal reads them again).
"""

from __future__ import annotations

import torch

PROMPT_TOKENS = 48
NEW_TOKENS = 128
BATCH = 32


def sample_text(model, tokenizer, prompt_text: str, tokens: int, *, seed: int = 0, progress=None) -> list[str]:
    """The teacher's continuations of windows of `prompt_text`, `tokens` new tokens in all, one string per
    sample (the continuation alone, cut at the first special token), in shuffled order."""
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    count = max(1, -(-tokens // NEW_TOKENS))
    ends = torch.linspace(min(8, len(ids)), len(ids), count).long().tolist()
    prompts = [ids[max(0, end - PROMPT_TOKENS) : end] or ids[:1] for end in ends]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = [t for t in tokenizer.all_special_tokens if t]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start : start + BATCH]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=NEW_TOKENS, pad_token_id=pad)
            for row in out:
                text = tokenizer.decode(row[width:])
                for stop in stops:
                    text = text.split(stop)[0]
                texts.append(text)
            if progress:
                progress(min(len(prompts), start + BATCH), len(prompts))
        order = torch.randperm(len(texts)).tolist()  # batches mix the prompts' subjects
    finally:
        torch.random.set_rng_state(generator_state)
    return [texts[i] for i in order]
