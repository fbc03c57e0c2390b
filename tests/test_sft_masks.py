"""For every SFT source, the loss mask trains exactly what the assistant writes (its text, its calculator
calls and <|assistant_end|>) and never the user's text or the tool's output."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spelling import SimpleSpelling, SpellingBee
from tasks.world.chat import chat_datasets

WORDS = ["banana", "strawberry", "committee", "bookkeeper", "mississippi", "apple", "letter", "balloon"]


def assistant_segments(conversation):
    """(trained text, untrained tool outputs) the mask must select / exclude."""
    trained, outputs = [], []
    for message in conversation["messages"]:
        if message["role"] != "assistant":
            continue
        content = message["content"]
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for part in parts:
            (outputs if part["type"] == "python_output" else trained).append(part["text"])
    return "".join(trained), outputs


def check_mask(tokenizer, conversation):
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=100_000)
    specials = {tokenizer.encode_special(n): n for n in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>",
                                                          "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                                          "<|output_start|>", "<|output_end|>", "<|bos|>")}
    trained_ids = [t for t, m in zip(ids, mask) if m]
    trained_specials = {specials[t] for t in trained_ids if t in specials}
    assert trained_specials <= {"<|python_start|>", "<|python_end|>", "<|assistant_end|>"}
    assert "<|assistant_end|>" in trained_specials
    expected_text, outputs = assistant_segments(conversation)
    assert tokenizer.decode([t for t in trained_ids if t not in specials]) == expected_text
    # tool outputs sit between <|output_start|> and <|output_end|>, all with mask 0
    inside = False
    for t, m in zip(ids, mask):
        if specials.get(t) == "<|output_start|>":
            inside = True
        if inside:
            assert m == 0
        if specials.get(t) == "<|output_end|>":
            inside = False
    user_ids = [t for t, m in zip(ids, mask) if not m]
    for message in conversation["messages"]:
        if message["role"] in ("user", "system") and message["content"]:
            assert tokenizer.encode(message["content"])[0] in user_ids
    return outputs


def test_synthetic_sft_masks(tokenizer):
    rows = chat_datasets(0)["sft_train"][:300]
    outputs = [check_mask(tokenizer, conv) for conv in rows]
    assert sum(bool(o) for o in outputs) > 20  # the sample includes calculator conversations


def test_gsm8k_masks(tokenizer, shared_data):
    task = GSM8K("train", path=shared_data / "gsm8k_sample.jsonl")
    outputs = [check_mask(tokenizer, task[i]) for i in range(len(task))]
    assert all(outputs)  # every GSM8K solution here uses the calculator


def test_spelling_masks(tokenizer):
    for task in (SimpleSpelling(size=20, words=WORDS), SpellingBee(size=20, words=WORDS)):
        for i in range(len(task)):
            check_mask(tokenizer, task[i])


def test_smoltalk_mmlu_customjson_masks(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour"},
                {"role": "assistant", "content": "Blue."}]
    pq.write_table(pa.table({"messages": [messages]}), tmp_path / "smol.parquet")
    check_mask(tokenizer, SmolTalk("train", paths=[tmp_path / "smol.parquet"])[0])

    row = {"question": "Which is a fruit?", "subject": "misc", "choices": ["rock", "apple", "car", "pen"], "answer": 1}
    pq.write_table(pa.table({"train": [row]}), tmp_path / "aux.parquet")
    conv = MMLU("auxiliary_train", "train", path=tmp_path / "aux.parquet")[0]
    check_mask(tokenizer, conv)
    assert conv["messages"][-1]["content"] == "B"

    (tmp_path / "identity.jsonl").write_text(
        '[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am nanopipe."}]\n')
    check_mask(tokenizer, CustomJSON(tmp_path / "identity.jsonl")[0])


def test_mask_check_catches_a_wrong_mask(tokenizer):
    conv = chat_datasets(0)["sft_train"][0]
    original = tokenizer.render_conversation
    try:
        tokenizer.render_conversation = lambda c, max_tokens: (original(c, max_tokens)[0],
                                                                [1] * len(original(c, max_tokens)[0]))
        with pytest.raises(AssertionError):
            check_mask(tokenizer, conv)
    finally:
        del tokenizer.render_conversation  # back to the class's method
