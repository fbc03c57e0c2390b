import csv
import hashlib
import json
import re
from collections import Counter

import pytest
import yaml

from nanopipe.core_eval import load_bundle
from nanopipe.tokenizer import check_conversation
from tasks.common import last_number
from tasks.world.chat import ARITH_PROMPTS, COUNT_ASK, QUESTIONS, SPELL_ASK
from tasks.world.core import core_items
from tasks.world.documents import generate_documents
from tasks.world.facts import build_world
from tasks.world.source import DOCS_PER_SHARD, write_extras


# the bundle's first five tasks, and the sha256 of their items for seed 0 as they were before more were added
ORIGINAL_TASKS = ["world_quiz_mc", "world_facts_mc", "world_facts_schema", "world_facts_lm", "world_arith_lm"]
ORIGINAL_DIGEST = "60aa1dd478a170ba720ac90ea83ce7510024ab9693b0308a94e3dda705c57245"


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
    facts = "eval_bundle/eval_data/world/world_facts_lm.jsonl"
    assert other[facts] != first[facts]


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
        assert 80 <= len(rows) <= 320 and 0 <= shots <= 5
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
        if kind == "language_modeling":  # what always writing the most common continuation scores
            most = max(Counter(row["continuation"] for row in rows).values())
            assert baseline == pytest.approx(100 * most / len(rows), rel=1e-3) and baseline > 0
    assert types == {"multiple_choice", "schema", "language_modeling"}
    # and the CORE evaluator reads it as a complete bundle
    tasks, missing = load_bundle(bundle)
    assert not missing and [t.label for t in tasks] == [t["label"] for t in config["icl_tasks"]]


def test_every_core_answer_is_in_the_pretraining_text(extras, first_shard_text):
    """The CORE items test knowledge, not guessing: each gold answer, in the item's own wording, is in the
    first shard of documents (the world is covered in rotation, so one shard suffices). The harder tasks are
    checked against the world itself: two-hop answers join two facts (person -> home city -> its country's
    language or export), spellings and sums are computed."""
    bundle = extras / "eval_bundle"
    world = build_world(0)
    by_capital = {c["capital"]: c for c in world.countries}
    home_of = {p["name"]: p["home"] for p in world.people}
    for task in yaml.safe_load((bundle / "core.yaml").read_text())["icl_tasks"]:
        for row in read_jsonl(bundle / "eval_data" / task["dataset_uri"]):
            if task["label"].startswith("world_two_hop"):
                relation = "language" if task["label"] == "world_two_hop_mc" else "export"
                who = re.fullmatch(r"(.+) lives in a country where .+|In the country whose capital is (\w+), .+",
                                   row["query"])
                country = by_capital[home_of[who[1]] if who[1] else who[2]]
                assert row["choices"][row["gold"]] == country[relation]
                continue
            if task["label"] == "world_spell_lm":
                word = re.fullmatch(r"The word ([a-z]+) is spelled", row["context"])[1]
                assert row["continuation"] == ",".join(word) and word in world.words
                continue
            if task["label"] == "world_sums_lm":
                a, b = map(int, re.fullmatch(r"(\d+) plus (\d+) equals", row["context"]).groups())
                assert int(row["continuation"]) == a + b
                continue
            if "choices" in row:
                gold_text = row["query"] + " " + row["choices"][row["gold"]]
            elif "context_options" in row:
                gold_text = row["context_options"][row["gold"]] + " " + row["continuation"]
            else:
                gold_text = row["context"] + " " + row["continuation"]
            assert gold_text in first_shard_text, (task["label"], gold_text)


def test_new_core_tasks_leave_the_old_items_unchanged(extras):
    """The five original tasks' files are what they were before tasks were added (their rng stream is theirs),
    so CORE numbers of old runs stay comparable task by task."""
    items = core_items(0)
    digest = hashlib.sha256(json.dumps([items[label] for label in ORIGINAL_TASKS]).encode()).hexdigest()
    assert digest == ORIGINAL_DIGEST


def test_chat_eval_world_mc_facts_are_in_pretraining_but_not_in_sft_multiple_choice(extras, first_shard_text):
    sft_mc = {u.split("\n")[0].removeprefix("Multiple Choice question: ")
              for u in user_texts(chat_rows(extras, "sft_train") + chat_rows(extras, "sft_val"))
              if u.startswith("Multiple Choice question: ")}
    rows = chat_rows(extras, "eval_world_mc")
    assert len(rows) % 4 == 0 and 100 <= len(rows) <= 300
    for row in rows:
        lines = row["messages"][0]["content"].split("\n")
        question = lines[0].removeprefix("Multiple Choice question: ")
        gold = next(line[2:-2] for line in lines if line.startswith("- ") and line.endswith(f"={row['answer']}"))
        assert row["letters"] == ["A", "B", "C", "D"] and row["messages"][1]["content"] == row["answer"]
        assert f"Question: {question}\nAnswer: {gold}" in first_shard_text
        assert question not in sft_mc
    # the gold letter sits equally often at each position, so always answering one letter scores 25 %
    answers = [r["answer"] for r in rows]
    assert {answers.count(letter) for letter in "ABCD"} == {len(rows) // 4}


def test_open_fact_questions_are_worded_as_no_sft_question_is(extras, first_shard_text):
    """world_facts: each question uses a phrasing no SFT question uses (SFT questions may be lower-cased or lose
    their final "?": those are checked too); its reference reply is the fact's sentence from pretraining."""
    train, held_out = ([re.escape(t).replace(re.escape("{s}"), ".+") for templates in QUESTIONS.values()
                        for t in templates[held]] for held in (0, 1))
    sft_users = set(user_texts(chat_rows(extras, "sft_train") + chat_rows(extras, "sft_val")))
    rows = chat_rows(extras, "eval_world_facts")
    assert len(rows) == 200
    for row in rows:
        question, reply = (m["content"] for m in row["messages"])
        assert reply in first_shard_text and row["answer"] in reply
        assert any(re.fullmatch(pattern, question) for pattern in held_out)
        assert not any(re.fullmatch(pattern + "[?.]?", question, re.IGNORECASE) for pattern in train), question
        assert not any(re.fullmatch(re.escape(u) + "[?.]?", question, re.IGNORECASE) for u in sft_users
                       if u.startswith(question[:6].lower()) or u.startswith(question[:6]))


def test_generative_chat_eval_questions_are_held_out(extras):
    """No eval question is an SFT question, and each is worded in one of the held-out phrasings."""
    sft_users = set(user_texts(chat_rows(extras, "sft_train") + chat_rows(extras, "sft_val")))
    asks = {"arith": ARITH_PROMPTS, "spell": SPELL_ASK, "count": COUNT_ASK}
    expression = r"\d+ ?(?:[-+*/x]|plus|minus|times|multiplied by|divided by) ?\d+"

    def pattern(template):
        return re.escape(template).replace(re.escape("{e}"), expression).replace(re.escape("{word}"), "[a-z]+") \
            .replace(re.escape("{letter}"), "[a-z]")

    for stem, size in (("eval_world_facts", 200), ("eval_world_arith", 200), ("eval_world_spell", 200)):
        rows = chat_rows(extras, stem)
        questions = user_texts(rows)
        assert len(rows) == size and len(set(questions)) == len(questions)
        assert not set(questions) & sft_users
    spelled = counted = sums = 0
    for row in chat_rows(extras, "eval_world_spell") + chat_rows(extras, "eval_world_arith"):
        question, reply = (m["content"] for m in row["messages"])
        if isinstance(reply, str):
            kind = "spell"
        elif ".count(" in reply[1]["text"]:
            kind = "count"
        elif re.fullmatch(r"\d+ [-+*/] \d+ = ", reply[0]["text"]):
            kind = "arith"
        else:
            continue  # a word problem: new by its numbers and names
        spelled, counted, sums = spelled + (kind == "spell"), counted + (kind == "count"), sums + (kind == "arith")
        train, held_out = asks[kind]
        assert any(re.fullmatch(pattern(t), question) for t in held_out), question
        assert not any(re.fullmatch(pattern(t) + "[?.]?", question, re.IGNORECASE) for t in train), question
    assert spelled > 40 and counted > 80 and sums > 60


def test_conversations_are_valid_and_varied(extras):
    sft = chat_rows(extras, "sft_train")
    assert len(sft) >= 5000 and len(chat_rows(extras, "sft_val")) >= 400
    for stem in ("sft_train", "sft_val", "eval_world_mc", "eval_world_facts", "eval_world_arith", "eval_world_spell"):
        for row in chat_rows(extras, stem):
            check_conversation(row)
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    assert any(len(r["messages"]) >= 4 for r in sft)
    replies = [m["content"] for r in sft for m in r["messages"]
               if m["role"] == "assistant" and isinstance(m["content"], str)]
    users = user_texts(sft)
    assert any("nanopipe" in t for t in replies)                                         # identity
    assert any(re.fullmatch(r"The word [a-z]+ is spelled [a-z](,[a-z])+\.", t) for t in replies)  # spelling
    assert any(t.startswith("I don't know") for t in replies)                           # not in the world
    assert sum(t in "ABCD" for t in replies) > 200                                       # multiple choice
    assert any(re.search(r"\b\d+\*\d+\b", u) for u in users) and any(" times " in u for u in users)  # sums
    assert len(set(users)) > 0.6 * len(users)                                            # mostly distinct
    texts = replies + [p["text"] for r in sft for m in r["messages"] if isinstance(m["content"], list)
                       for p in m["content"]]
    assert not any("####" in t for t in texts)  # plain sentences: the GSM8K marker is not taught


def test_tool_calls_compute_the_right_outputs_and_answers(extras):
    """Recompute every tool call independently of the calculator: digit arithmetic with Python, letter
    counts with str.count; the reply's last number (and `answer`) is the last tool result."""
    checked = 0
    for stem in ("sft_train", "sft_val", "eval_world_arith", "eval_world_spell"):
        for row in chat_rows(extras, stem):
            results = []
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
                        word, letter = re.fullmatch(r"' ([a-z]+)'\.count\('([a-z])'\)", expr).groups()
                        expected = word.count(letter)
                    assert float(output["text"]) == expected, expr
                    results.append(output["text"])
                    checked += 1
                assert last_number(parts[-1]["text"]) == results[-1]
            if "answer" in row and results:
                assert str(row["answer"]) == results[-1]
    assert checked > 3000
