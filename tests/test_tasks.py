import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe.common import UserError
from nanopipe.calculator import calculate
from nanopipe.shards import dataset_dir
from nanopipe.tokenizer import check_conversation
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, last_number, render_mc, same_number
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, final_answer, solution_parts
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spelling import SimpleSpelling, SpellingBee, load_words
from tasks.world.chat import SFT_TRAIN_SIZE, SFT_VAL_SIZE
from tasks.world.source import write_extras
from tasks.world.tasks import SyntheticSFT, WorldArith, WorldFacts, WorldMC, WorldSpell

NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                       "How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def reply_text(conversation):
    """The assistant's reply as chat_eval scores it (tool calls and outputs included, as the engine injects them,
    each part apart from the next)."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else " ".join(part["text"] for part in content)


class Numbers(Task):
    """A tiny real task: example i is a conversation about the number i."""
    name = "numbers"

    def __init__(self, n, tag="n"):
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"},
                             {"role": "assistant", "content": str(index)}], "answer": str(index)}

    def evaluate(self, conversation, completion):
        return same_number(last_number(completion), conversation["answer"])


def tags(task):
    return [c["messages"][0]["content"] for c in task]


# -----------------------------------------------------------------------------
# common: indexing, slicing, shuffling, mixtures, MC format, number scoring

def test_slicing_and_shuffling_are_views_with_the_base_scoring():
    task = Numbers(10)
    assert len(task) == 10 and task[-1] == task[9]
    with pytest.raises(IndexError):
        task[10]
    assert tags(task[2:5]) == ["n2", "n3", "n4"]
    assert tags(task[::3]) == ["n0", "n3", "n6", "n9"]
    assert tags(task[2:8][1:3]) == ["n3", "n4"]
    shuffled = task.shuffled(7)
    assert tags(shuffled) == tags(task.shuffled(7)) != tags(task.shuffled(8))
    assert sorted(tags(shuffled)) == sorted(tags(task)) and tags(shuffled) != tags(task)
    view = shuffled[:3]
    assert view.evaluate(view[0], f"the answer is {view[0]['answer']}")
    assert not view.evaluate(view[0], "the answer is 99")


def test_mixture_is_one_deterministic_shuffle_with_epochs():
    a, b = Numbers(6, "a"), Numbers(4, "b")
    mix = TaskMixture([(a, 2), b, (Numbers(10, "c"), 0.5)])
    assert len(mix) == 12 + 4 + 5
    contents = tags(mix)
    assert contents == tags(TaskMixture([(a, 2), b, (Numbers(10, "c"), 0.5)]))
    assert contents != tags(TaskMixture([(a, 2), b, (Numbers(10, "c"), 0.5)], seed=1))
    assert sorted(contents) == sorted(tags(a) * 2 + tags(b) + ["c0", "c1", "c2", "c3", "c4"])
    # shuffled across tasks, not task after task
    assert {t[0] for t in contents[:8]} != {"a"} and contents[:12] != sorted(contents[:12])
    assert tags(mix[3:6]) == contents[3:6]


def test_render_mc_matches_nanochat_format():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
                    "Respond only with the letter of the correct answer.")


def test_last_number_rule():
    assert last_number("so 3 + 4 = 7 apples, and 1,234.50 more") == "1234.50"
    assert last_number("no digits") is None
    assert same_number(last_number("#### 72"), "72") and same_number("72.0", 72)
    assert not same_number(last_number("72 or maybe 73"), "72")
    assert not same_number(None, "72")


def test_check_conversation():
    good = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}
    check_conversation(good)
    for bad in ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                [{"role": "user", "content": "x"}],
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "code", "text": "1"}]}],
                [{"role": "user", "content": [{"type": "text", "text": "x"}]}, {"role": "assistant", "content": "y"}]):
        with pytest.raises(ValueError):
            check_conversation({"messages": bad})


# -----------------------------------------------------------------------------
# GSM8K

def test_gsm8k_annotations_become_tool_calls():
    assert solution_parts(NATALIA["answer"]) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert final_answer("so\n#### 1,000") == "1000"


def test_gsm8k_from_default_parquet_path_and_scoring(isolated_dirs):
    with pytest.raises(UserError, match=r"gsm8k.*python -m scripts.dataset chat-data"):
        GSM8K("test")
    write_parquet(isolated_dirs / "chat_data/gsm8k/main/test-00000-of-00001.parquet",
                  [NATALIA, {"question": "What is 6 times 7?", "answer": "6*7 = <<6*7=42>>42\n#### 42"}])
    task = GSM8K("test")
    assert len(task) == 2 and task.eval_type == "generative"
    item = task[1]
    check_conversation(item)
    assert item["answer"] == "42"
    assert task.evaluate(item, reply_text(item))
    assert task.evaluate(item, "I think it is 40... no, 42.")
    assert not task.evaluate(item, "#### 42\nActually 43")


def test_gsm8k_real_sample(shared_data):
    task = GSM8K(path=shared_data / "gsm8k_sample.jsonl")
    assert len(task) == 20
    calls = 0
    for item in task:
        check_conversation(item)
        assert task.evaluate(item, reply_text(item))  # the reference solution scores as correct
        parts = item["messages"][1]["content"]
        for call, output in zip(parts, parts[1:]):
            if call["type"] == "python":
                calls += 1
                assert output["type"] == "python_output"
                result = calculate(call["text"])  # what the engine would inject
                assert result is not None and abs(float(result) - float(output["text"])) < 0.01, call
    assert calls > 20


# -----------------------------------------------------------------------------
# MMLU, ARC, SmolTalk, HumanEval, CustomJSON

def test_mmlu_test_and_nested_auxiliary_train(tmp_path):
    row = {"question": "Which gas do plants take in?", "subject": "biology",
           "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "answer": 1}
    test = MMLU("all", "test", path=write_parquet(tmp_path / "test.parquet", [row]))
    aux = MMLU("auxiliary_train", "train", path=write_parquet(tmp_path / "aux.parquet", [{"train": row}]))
    for task in (test, aux):
        item = task[0]
        assert task.eval_type == "categorical" and item["letters"] == ["A", "B", "C", "D"] and item["answer"] == "B"
        assert item["messages"][0]["content"] == render_mc(row["question"], "ABCD", row["choices"])
        assert item["messages"][1]["content"] == "B" and task.evaluate(item, " B") and not task.evaluate(item, "C")


def test_arc_uses_the_rows_own_labels(isolated_dirs):
    rows = [{"id": "q1", "question": "What melts ice?", "answerKey": "C",
             "choices": {"text": ["cold", "dark", "heat", "wind"], "label": ["A", "B", "C", "D"]}},
            {"id": "q2", "question": "How many legs has a spider?", "answerKey": "2",
             "choices": {"text": ["six", "eight", "ten"], "label": ["1", "2", "3"]}}]
    write_parquet(isolated_dirs / "chat_data/arc/ARC-Challenge/test-00000-of-00001.parquet", rows)
    task = ARC("ARC-Challenge", "test")
    assert task.name == "ARC-Challenge" and len(task) == 2
    assert task[0]["answer"] == "C" and task[1]["letters"] == ["1", "2", "3"] and task[1]["answer"] == "2"
    assert "- eight=2\n" in task[1]["messages"][0]["content"]


def test_smoltalk_rows_and_malformed_row(tmp_path):
    good = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}], "source": "x"}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"}], "source": "x"}
    paths = [write_parquet(tmp_path / "a.parquet", [good, good]), write_parquet(tmp_path / "b.parquet", [bad])]
    task = SmolTalk(paths=paths)
    assert len(task) == 3 and task[1] == {"messages": good["messages"]}
    with pytest.raises(UserError, match="SmolTalk row 2"):
        task[2]


HUMANEVAL_ROW = {"task_id": "T/0", "entry_point": "add",
                 "prompt": "import math\n\n\ndef add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n",
                 "canonical_solution": "    return a + b\n",
                 "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"
                         "    assert math.isclose(candidate(0.5, 0.25), 0.75)\n"}


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed: sudo apt-get install "
                    "bubblewrap (.ci/run installs it)")
def test_humaneval_scoring_runs_the_tests_sandboxed(tmp_path):
    task = HumanEval(path=write_parquet(tmp_path / "he.parquet", [HUMANEVAL_ROW]))
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert task.evaluate(item, "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.")
    assert not task.evaluate(item, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not task.evaluate(item, "def add(a, b):\n    return math.nope(a)\n")


def test_humaneval_real_sample_unsafe_exec(shared_data):
    task = HumanEval(path=shared_data / "humaneval_sample.jsonl", unsafe_exec=True)  # sandboxed: test_sandbox.py
    item = task[0]
    assert task.evaluate(item, item["messages"][1]["content"])
    assert not task.evaluate(item, item["prompt"] + "    return False\n")


def test_customjson_both_line_formats_and_errors(tmp_path):
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanopipe."}]
    path = tmp_path / "identity.jsonl"
    path.write_text(json.dumps(messages) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2 and task[0] == task[1] == {"messages": messages} and task.name == "identity"
    path.write_text(json.dumps(messages) + "\n" + json.dumps(messages[:1]) + "\n")
    with pytest.raises(UserError, match="identity.jsonl:2: malformed conversation"):
        CustomJSON(path)
    path.write_text("{not json\n")
    with pytest.raises(UserError, match="identity.jsonl:1"):
        CustomJSON(path)
    with pytest.raises(UserError, match="identity"):
        CustomJSON()  # the default identity download is absent


# -----------------------------------------------------------------------------
# spelling

def test_spelling_tasks(isolated_dirs):
    with pytest.raises(UserError, match="words_alpha.txt"):
        load_words()
    words_file = isolated_dirs / "chat_data/words/words_alpha.txt"
    words_file.parent.mkdir(parents=True)
    words_file.write_text("strawberry\nbanana\nA\nkiwi\nno-thanks\nmississippi\n")
    assert load_words() == ["strawberry", "banana", "kiwi", "mississippi"]
    spell = SimpleSpelling(size=20)
    word, spelled = spell[3]["messages"][1]["content"].split(":")
    assert spelled.split(",") == list(word)
    bee = SpellingBee(size=50, split="test")
    assert tags(bee) == tags(SpellingBee(size=50, split="test")) != tags(SpellingBee(size=50, split="train"))
    for item in bee:
        check_conversation(item)
        call, output = item["messages"][1]["content"][1:3]
        word, letter = call["text"].split("'")[1].strip(), call["text"].split("'")[3]
        assert call["text"] == f"' {word}'.count('{letter}')" and int(output["text"]) == word.count(letter)
        assert item["messages"][1]["content"][0]["text"].startswith(f"The word {word} is spelled {','.join(word)}.")
        assert item["answer"] == word.count(letter)
        assert bee.evaluate(item, reply_text(item))
        assert not bee.evaluate(item, f"It appears {item['answer'] + 1} times.")


# -----------------------------------------------------------------------------
# the synthetic world's chat tasks

def test_synthetic_chat_tasks(isolated_dirs):
    with pytest.raises(UserError, match="python -m scripts.dataset synthetic"):
        WorldMC()
    write_extras(0, dataset_dir("synthetic"))
    sft = SyntheticSFT("train")
    assert len(sft) == SFT_TRAIN_SIZE and len(SyntheticSFT("val")) == SFT_VAL_SIZE
    mc = WorldMC()
    assert mc.eval_type == "categorical" and mc.baseline == 0.25
    assert mc.evaluate(mc[0], mc[0]["answer"]) and mc[0]["letters"] == ["A", "B", "C", "D"]
    for task, size in ((WorldFacts(), 200), (WorldArith(), 200), (WorldSpell(), 200)):
        assert task.eval_type == "generative" and len(task) == size
        assert all(task.evaluate(item, reply_text(item)) for item in task)
        assert not task.evaluate(task[0], "I do not know")
    facts = WorldFacts()
    item = {**facts[0], "answer": "Lorv"}
    assert facts.evaluate(item, "It is lorv.") and not facts.evaluate(item, "It is Lorvholm.")
    mixture = TaskMixture([(sft, 1), (mc[:8], 2)])
    assert len(mixture) == len(sft) + 16
