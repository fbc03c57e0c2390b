import csv
import json
import re

import pytest
import yaml

from nanopipe.core_eval import load_bundle
from nanopipe.tokenizer import check_conversation
from tasks.common import last_number
from tasks.world.documents import generate_documents
from tasks.world.source import DOCS_PER_SHARD, write_extras


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_extras(0, out)
    return out


@pytest.fixture(scope="module")
def first_shard_text():
    return "\n".join(generate_documents(0, DOCS_PER_SHARD))


def chat_rows(extras, stem):
    return read_jsonl(extras / "chat" / f"{stem}.jsonl")


def user_texts(rows):
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


def test_documents_are_deterministic_and_prefix_stable():
    docs = list(generate_documents(0, 300))
    assert docs == list(generate_documents(0, 300))
    assert docs[:120] == list(generate_documents(0, 120))
    other = list(generate_documents(1, 300))
    assert other != docs and len(set(other) & set(docs)) < 30  # a different world, not a reshuffle
    assert all(isinstance(d, str) and len(d) > 40 for d in docs)


def test_extras_are_byte_identical_for_a_seed_and_differ_across_seeds(extras, tmp_path):
    write_extras(0, tmp_path / "again")
    write_extras(1, tmp_path / "other")
    first, again, other = all_files(extras), all_files(tmp_path / "again"), all_files(tmp_path / "other")
    assert first == again
    assert set(other) == set(first)
    assert other["chat/sft_train.jsonl"] != first["chat/sft_train.jsonl"]
    assert other["eval_bundle/eval_data/world/world_facts_lm.jsonl"] != first["eval_bundle/eval_data/world/world_facts_lm.jsonl"]


def test_core_bundle_layout_and_schemas(extras):
    bundle = extras / "eval_bundle"
    config = yaml.safe_load((bundle / "core.yaml").read_text())
    with open(bundle / "eval_meta_data.csv", newline="") as f:
        meta = {row["Eval Task"]: row for row in csv.DictReader(f)}
    types = set()
    for task in config["icl_tasks"]:
        label, kind, (shots,) = task["label"], task["icl_task_type"], task["num_fewshot"]
        rows = read_jsonl(bundle / "eval_data" / task["dataset_uri"])
        types.add(kind)
        assert 100 <= len(rows) <= 300 and 0 <= shots <= 5
        assert task["continuation_delimiter"] == " "
        assert int(meta[label]["#datapoints"]) == len(rows)
        baseline = float(meta[label]["Random baseline"])
        for row in rows:
            if kind == "multiple_choice":
                assert set(row) == {"query", "choices", "gold"}
                assert len(set(row["choices"])) == len(row["choices"]) == 4 and 0 <= row["gold"] < 4
                assert baseline == 25
            elif kind == "schema":
                assert set(row) == {"context_options", "continuation", "gold"}
                assert len(set(row["context_options"])) == 2 and row["gold"] in (0, 1)
                assert baseline == 50
            else:
                assert set(row) == {"context", "continuation"}
                assert row["context"] == row["context"].strip() and row["continuation"]
                assert baseline == 0
    assert types == {"multiple_choice", "schema", "language_modeling"}
    # and the CORE evaluator reads it as a complete bundle
    tasks, missing = load_bundle(bundle)
    assert not missing and [t.label for t in tasks] == [t["label"] for t in config["icl_tasks"]]


def test_every_core_answer_is_in_the_pretraining_text(extras, first_shard_text):
    """The CORE items test knowledge, not guessing: each gold answer, in the item's own wording, is in the
    first shard of documents (the world is covered in rotation, so one shard suffices)."""
    bundle = extras / "eval_bundle"
    for task in yaml.safe_load((bundle / "core.yaml").read_text())["icl_tasks"]:
        for row in read_jsonl(bundle / "eval_data" / task["dataset_uri"]):
            if "choices" in row:
                gold_text = row["query"] + " " + row["choices"][row["gold"]]
            elif "context_options" in row:
                gold_text = row["context_options"][row["gold"]] + " " + row["continuation"]
            else:
                gold_text = row["context"] + " " + row["continuation"]
            assert gold_text in first_shard_text, (task["label"], gold_text)


def test_chat_eval_world_facts_are_in_pretraining_but_not_in_sft(extras, first_shard_text):
    sft_users = "\n".join(user_texts(chat_rows(extras, "sft_train") + chat_rows(extras, "sft_val")))
    rows = chat_rows(extras, "eval_world_mc")
    assert len(rows) % 4 == 0 and 100 <= len(rows) <= 300
    for row in rows:
        lines = row["messages"][0]["content"].split("\n")
        question = lines[0].removeprefix("Multiple Choice question: ")
        gold = next(line[2:-2] for line in lines if line.startswith("- ") and line.endswith(f"={row['answer']}"))
        assert row["letters"] == ["A", "B", "C", "D"] and row["messages"][1]["content"] == row["answer"]
        assert f"Question: {question}\nAnswer: {gold}" in first_shard_text
        assert question not in sft_users
    # the gold letter sits equally often at each position, so always answering one letter scores 25 %
    answers = [r["answer"] for r in rows]
    assert {answers.count(letter) for letter in "ABCD"} == {len(rows) // 4}


def test_generative_chat_eval_questions_are_held_out(extras):
    sft = chat_rows(extras, "sft_train") + chat_rows(extras, "sft_val")
    sft_users = set(user_texts(sft))
    sft_count_words = {p["text"].split("'")[1] for r in sft for m in r["messages"] if isinstance(m["content"], list)
                       for p in m["content"] if p["type"] == "python" and ".count(" in p["text"]}
    for stem in ("eval_world_arith", "eval_world_spell"):
        rows = chat_rows(extras, stem)
        questions = user_texts(rows)
        assert len(rows) == 200 and len(set(questions)) == len(questions)
        assert not set(questions) & sft_users
    for row in chat_rows(extras, "eval_world_spell"):
        word = row["messages"][1]["content"][1]["text"].split("'")[1]
        assert word not in sft_count_words


def test_conversations_are_valid_and_varied(extras):
    sft = chat_rows(extras, "sft_train")
    assert len(sft) >= 5000 and len(chat_rows(extras, "sft_val")) >= 400
    for stem in ("sft_train", "sft_val", "eval_world_mc", "eval_world_arith", "eval_world_spell"):
        for row in chat_rows(extras, stem):
            check_conversation(row)
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    assert any(len(r["messages"]) >= 4 for r in sft)
    replies = [m["content"] for r in sft for m in r["messages"] if m["role"] == "assistant" and isinstance(m["content"], str)]
    assert any("nanopipe" in t for t in replies)                     # identity
    assert any(re.fullmatch(r"[a-z]+:[a-z](,[a-z])+", t) for t in replies)  # spelling
    assert sum(t in "ABCD" for t in replies) > 500                    # multiple choice
    assert len(set(user_texts(sft))) > 0.6 * len(user_texts(sft))     # mostly distinct questions


def test_tool_calls_compute_the_right_outputs_and_answers(extras):
    """Recompute every tool call independently of the calculator: digit arithmetic with Python, letter
    counts with str.count; the final `#### n` (and `answer`) is the last tool result."""
    checked = 0
    for stem in ("sft_train", "sft_val", "eval_world_arith", "eval_world_spell"):
        for row in chat_rows(extras, stem):
            for message in row["messages"]:
                parts = message["content"]
                if not isinstance(parts, list):
                    continue
                results = []
                for call, output in zip(parts, parts[1:]):
                    if call["type"] != "python":
                        continue
                    assert output["type"] == "python_output"
                    expr = call["text"]
                    if re.fullmatch(r"[\d+\-*/]+", expr):
                        expected = eval(expr)  # digits and operators only, checked just above
                    else:
                        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", expr).groups()
                        expected = word.count(letter)
                    assert float(output["text"]) == expected, expr
                    results.append(output["text"])
                    checked += 1
                final = parts[-1]["text"]
                assert final.endswith(f"#### {results[-1]}")
                assert last_number(final) == results[-1]
            if "answer" in row:
                assert str(row["answer"]) == results[-1]
    assert checked > 3000
