"""
MMLU (cais/mmlu): four-choice questions in 57 subjects. `all/test` is a categorical eval (ChatCORE
baseline 25 %); `auxiliary_train` (~100K questions from other MC datasets) is SFT data that teaches the
multiple-choice format. In the HF parquet of auxiliary_train every row is nested under a `train` column.
"""

from tasks.common import ParquetRows, Task, chat_file, mc_conversation

LETTERS = "ABCD"
FILES = {("all", "test"): "all/test-00000-of-00001.parquet",
         ("auxiliary_train", "train"): "auxiliary_train/train-00000-of-00001.parquet"}


class MMLU(Task):
    name = "MMLU"
    eval_type = "categorical"
    baseline = 0.25

    def __init__(self, subset: str = "all", split: str = "test", path=None):
        if (subset, split) not in FILES:
            raise ValueError(f"MMLU has subset/split {sorted(FILES)}, not {(subset, split)}")
        path = chat_file(path, "mmlu", FILES[subset, split])
        columns = ("train",) if subset == "auxiliary_train" else ("question", "choices", "answer")
        self.rows = ParquetRows([path], "mmlu", columns)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        row = row.get("train", row)  # auxiliary_train nests each row
        letters = LETTERS[:len(row["choices"])]
        item = mc_conversation(row["question"], letters, row["choices"], letters[row["answer"]])
        item["subject"] = row.get("subject", "")
        return item
