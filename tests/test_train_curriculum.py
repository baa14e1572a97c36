"""Curriculum folders: the shipped sample, and malformed lines reported with file and line."""

from __future__ import annotations

import json

import pytest

from qwenforge.errors import QwenforgeError
from qwenforge.train.curriculum import dpo_records, load_curriculum, sample_curriculum, sft_records


def test_sample_curriculum_is_valid_and_small():
    curriculum = load_curriculum("sample")
    assert curriculum.folder == sample_curriculum()
    assert [t.name for t in curriculum.topics] == ["tokens", "attention"]
    for topic in curriculum.topics:
        assert 20 <= len(topic.sft) <= 40 and 10 <= len(topic.dpo) <= 20 and len(topic.eval) >= 5
        eval_prompts = {item["prompt"] for item in topic.eval}
        assert not eval_prompts & {r["messages"][1]["content"] for r in topic.sft}  # eval prompts are held out
        # The teaching voice: every SFT answer and every chosen DPO answer carries all three markers.
        for text in [r["messages"][-1]["content"] for r in topic.sft] + [r["chosen"] for r in topic.dpo]:
            assert all(marker in text for marker in curriculum.voice_markers), text
    assert curriculum.voice_markers == ("Picture", "Here's the nub", "Try it yourself")


def test_records_put_the_loss_on_the_answer():
    topic = load_curriculum("sample").topics[0]
    record = sft_records(topic)[0]
    assert [m["role"] for m in record["prompt"]] == ["system", "user"] and record["completion"][0]["role"] == "assistant"
    pair = dpo_records(topic)[0]
    assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"


def make(tmp_path, sft_lines: list[str], dpo_lines: list[str] | None = None, topics=("one",)):
    (tmp_path / "curriculum.yaml").write_text("topics: [" + ", ".join(topics) + "]\n")
    folder = tmp_path / topics[0]
    folder.mkdir()
    (folder / "sft.jsonl").write_text("\n".join(sft_lines) + "\n")
    if dpo_lines is not None:
        (folder / "dpo.jsonl").write_text("\n".join(dpo_lines) + "\n")
    return tmp_path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize(
    "sft, dpo, where, what",
    [
        ([GOOD, "{not json"], None, "sft.jsonl:2", "not valid JSON"),
        ([GOOD, json.dumps({"messages": [{"role": "user", "content": "q"}]})], None, "sft.jsonl:2", "last message must be the assistant"),
        ([json.dumps({"messages": [{"role": "robot", "content": "q"}]})], None, "sft.jsonl:1", "messages[0].role"),
        ([GOOD], [json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"})], "dpo.jsonl:1", "identical"),
        ([GOOD], ["", json.dumps({"prompt": "p", "chosen": "x"})], "dpo.jsonl:2", 'field "rejected"'),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, sft, dpo, where, what):
    folder = make(tmp_path, sft, dpo)
    with pytest.raises(QwenforgeError) as error:
        load_curriculum(folder)
    assert f"{folder / 'one' / where.split(':')[0]}:{where.split(':')[1]}: " in str(error.value) and what in str(error.value)


def test_missing_topic_folder_and_index(tmp_path):
    with pytest.raises(QwenforgeError, match="curriculum.yaml: not found"):
        load_curriculum(tmp_path)
    make(tmp_path, [GOOD], topics=("one", "two"))
    with pytest.raises(QwenforgeError, match=r"two/sft.jsonl: missing \(topic 'two'"):
        load_curriculum(tmp_path)
