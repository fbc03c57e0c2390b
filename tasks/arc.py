"""
ARC (allenai/ai2_arc): grade-school science questions, ARC-Easy and ARC-Challenge; categorical eval
(ChatCORE baseline 25 %) and SFT data. The answer letters are the row's own labels: mostly A-D, but some
rows have 3 or 5 choices and a few use 1-4.
"""

from tasks.common import ParquetRows, Task, chat_file, mc_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"
    baseline = 0.25

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", path=None):
        if subset not in SUBSETS or split not in SPLITS:
            raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {SPLITS}, got {subset!r}/{split!r}")
        self.name = subset
        path = chat_file(path, "arc", f"{subset}/{split}-00000-of-00001.parquet")
        self.rows = ParquetRows([path], "arc", ("question", "choices", "answerKey"))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        letters, choices = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {index}: answer {row['answerKey']!r} is not one of the labels {letters}")
        return mc_conversation(row["question"], letters, choices, row["answerKey"])
