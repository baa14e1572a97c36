"""Accuracy and voice fidelity: the documented composites, on the offline MiniLM sentence model."""

from __future__ import annotations

from qwenforge.train.evaluate import VoiceRules, similarities, similarity_method, score_answers

RULES = VoiceRules(markers=("Picture", "Here's the nub", "Try it yourself"), negative_patterns=("As an AI",), markers_needed=2)
ITEM = {
    "prompt": "What tells a model to stop generating?",
    "reference": "Picture the final chalk line. Here's the nub: the end of sequence token tells generation to stop.",
    "key_phrases": ["end", "stop"],
}


def test_semantic_similarity_ranks_paraphrase_above_unrelated():
    assert similarity_method() == "all-MiniLM-L6-v2"
    paraphrase, unrelated = similarities(
        ["Generation halts when the model emits its end-of-sequence token.", "Bananas are rich in potassium."],
        [ITEM["reference"]] * 2,
    )
    assert paraphrase > 0.4 > unrelated


def test_scores_follow_the_documented_formulas():
    exact = score_answers([ITEM], [ITEM["reference"]], RULES)
    assert abs(exact["accuracy"] - (0.7 * exact["similarity"] + 0.3 * 1.0)) < 1e-9
    assert abs(exact["voice"] - (0.5 * exact["similarity"] + 0.3 * 1.0 + 0.2 * 1.0)) < 1e-9
    assert exact["similarity"] > 0.99
    bland = score_answers([ITEM], ["As an AI, I think it just ends."], RULES)
    assert bland["clean"] == 0.0 and bland["markers"] == 0.0
    assert bland["voice"] < exact["voice"] - 0.5 and bland["accuracy"] < exact["accuracy"]
    one_marker = score_answers([ITEM], ["Picture this: the end token makes it stop."], RULES)
    assert one_marker["markers"] == 0.5 and one_marker["clean"] == 1.0
    assert score_answers([], [], RULES)["accuracy"] is None
