"""Text sampled from the teacher itself, as more healing text (sequence-level distillation).

A packaged calibration text is a few thousand tokens; a heal that moves rows or maps over a whole
vocabulary needs more, and text a user has at hand may not look like what the model will read. The
teacher's own continuations follow its distribution (temperature 1, no top-k/top-p), so cross-entropy
on them is distillation too. A quarter of the prompts are windows of the healing text, spread over it,
so the samples stay near its subjects; the rest open kinds of text it lacks (OPENERS: code, markup,
math). Only the continuations are kept: the windows are the healing text itself, and
keeping them repeated it about twelve times over (a vocabulary heal learned calibration.txt by heart,
0.16 bits/byte against the source's 0.92, and a later fine-tune on it then hurt held-out text).
The same seed gives the same samples (a resumed heal reads them again).
"""

from __future__ import annotations

import torch

PROMPT_TOKENS = 48
NEW_TOKENS = 128
BATCH = 32
# Openers of kinds of text a model is run on that a prose calibration text barely holds: code in the
# common languages, markup, data formats, math. A transplant's new tokens are mostly code pieces: from
# SmolLM2-135M, 8,192 sampled tokens held 705 distinct new Qwen2.5 tokens from these openers against
# about 305 from calibration windows, and an 8-minute vocabulary heal on samples three quarters opened
# so reached 1.181 bits/byte on heldout.txt against 1.205 (benchmarks/vocab_transplant.py).
OPENERS = ("```python\n", "```javascript\n", "```typescript\n", "```java\n", "```c\n", "```cpp\n", "```go\n", "```rust\n",
           "```sql\n", "```bash\n", "```html\n", "```css\n", "```json\n", "```yaml\n", "# ", "$$\n")
OPENER_SHARE = 0.75  # of the samples; the rest continue the healing text


def sample_prompts(tokenizer, prompt_text: str, count: int) -> list[list[int]]:
    """`count` prompts: windows spread over `prompt_text`, then the openers in turn (OPENER_SHARE of them)."""
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    openers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in OPENERS]
    opened = round(count * OPENER_SHARE)
    ends = torch.linspace(min(8, len(ids)), len(ids), count - opened).long().tolist() if count > opened else []
    return [ids[max(0, end - PROMPT_TOKENS) : end] or ids[:1] for end in ends] + [openers[i % len(openers)] for i in range(opened)]


def sample_text(model, tokenizer, prompt_text: str, tokens: int, *, seed: int = 0, progress=None) -> list[str]:
    """The teacher's continuations of `sample_prompts`, `tokens` new tokens in all, one string per
    sample (the continuation alone, cut at the first special token), in shuffled order."""
    prompts = sample_prompts(tokenizer, prompt_text, max(1, -(-tokens // NEW_TOKENS)))
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
