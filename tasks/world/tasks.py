"""
The synthetic world's chat data (tasks/world/source.py writes it under <base>/data/synthetic/chat/):
SFT conversations and three chat-eval tasks whose questions are held out of the SFT files.

- SyntheticSFT("train" | "val"): world questions, calculator arithmetic, letter counting, spelling, identity.
- WorldMC: categorical, 4 letters, baseline 25 % (each fact appears with the gold in every position).
- WorldArith, WorldSpell: generative; a completion passes if its last number is the item's `answer`.
"""

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


class _LastNumberTask(_SyntheticChat):
    eval_type = "generative"
    baseline = 0.0

    def check_example(self, example):
        super().check_example(example)
        if not same_number(example.get("answer"), example.get("answer")):
            raise ValueError("the item needs a numeric 'answer'")

    def evaluate(self, conversation, completion):
        return same_number(last_number(completion), conversation["answer"])


class WorldArith(_LastNumberTask):
    name = "world_arith"
    stem = "eval_world_arith"


class WorldSpell(_LastNumberTask):
    name = "world_spell"
    stem = "eval_world_spell"

