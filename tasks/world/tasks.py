"""
The synthetic world's chat data (tasks/world/source.py writes it under <base>/data/synthetic/chat/):
SFT conversations and four chat-eval tasks whose questions are held out of the SFT files.

- SyntheticSFT("train" | "val"): world questions, calculator arithmetic, letter counting, spelling, identity.
- WorldMC: categorical, 4 letters, baseline 25 % (each fact appears with the gold in every position).
- WorldFacts (questions about held-out facts, in held-out phrasings), WorldArith (sums in symbols and words,
  word problems; with the calculator), WorldSpell (letter counting and spelling out held-out words): generative;
  a completion passes if its last number is the item's numeric `answer`, or if it contains its text `answer`.
"""

import re
from pathlib import Path

from nanopipe.shards import dataset_dir
from tasks.common import JsonlRows, Task, last_number, require_file, same_number

MAKE_COMMAND = "run `python -m scripts.dataset synthetic` first"


class _SyntheticChat(Task):
    stem = ""

    def __init__(self, data_dir=None):
        """`data_dir`: the synthetic dataset folder (default <base>/data/synthetic)."""
        data_dir = dataset_dir("synthetic") if data_dir is None else Path(data_dir)
        self.rows = JsonlRows(require_file(data_dir / "chat" / f"{self.stem}.jsonl", "synthetic chat",
                                           MAKE_COMMAND))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]


class SyntheticSFT(_SyntheticChat):
    name = "SyntheticSFT"

    def __init__(self, split: str = "train", data_dir=None):
        if split not in ("train", "val"):
            raise ValueError(f"SyntheticSFT split must be train or val, got {split!r}")
        self.stem = f"sft_{split}"
        super().__init__(data_dir)


class WorldMC(_SyntheticChat):
    name = "world_mc"
    stem = "eval_world_mc"
    eval_type = "categorical"
    baseline = 0.25


class _AnswerTask(_SyntheticChat):
    """Generative, scored by the item's `answer`: a number must be the completion's last number; a text must
    appear in the completion as a whole word or phrase, case ignored. `answers` names the kinds a task takes."""
    eval_type = "generative"
    baseline = 0.0
    answers = ("number",)

    def check_example(self, example):
        super().check_example(example)
        answer = example.get("answer")
        if not (("number" in self.answers and same_number(answer, answer))
                or ("text" in self.answers and isinstance(answer, str) and answer.strip())):
            wanted = {("number",): "a numeric 'answer'", ("text",): "an 'answer' text"}
            wanted = wanted.get(self.answers, "an 'answer': number or text")
            raise ValueError(f"the item needs {wanted}")

    def evaluate(self, conversation, completion):
        answer = conversation["answer"]
        if same_number(answer, answer):
            return same_number(last_number(completion), answer)
        return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", completion, re.IGNORECASE) is not None


class WorldFacts(_AnswerTask):
    name = "world_facts"
    stem = "eval_world_facts"
    answers = ("text",)


class WorldArith(_AnswerTask):
    name = "world_arith"
    stem = "eval_world_arith"


class WorldSpell(_AnswerTask):
    name = "world_spell"
    stem = "eval_world_spell"
    answers = ("number", "text")  # letter counts, and words spelled out
