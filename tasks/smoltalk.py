"""
SmolTalk (HuggingFaceTB/smol-smoltalk): ~460K general chat conversations (train) and ~24K (test), the bulk
of nanochat's SFT mixture. Rows are `messages` lists (optional system message, then user/assistant).
"""

from nanopipe.common import UserError
from nanopipe.tokenizer import check_conversation
from tasks.chat_data import chat_data_file
from tasks.common import ParquetRows, Task, require_file

TRAIN_FILES = [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
TEST_FILES = ["data/test-00000-of-00001.parquet"]


class SmolTalk(Task):
    name = "SmolTalk"
    eval_type = "generative"

    def __init__(self, split: str = "train", paths=None):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        if paths is None:
            paths = [chat_data_file("smoltalk", f) for f in (TRAIN_FILES if split == "train" else TEST_FILES)]
        else:
            paths = [require_file(p, "smoltalk data") for p in paths]
        self.paths = paths
        self.rows = ParquetRows(paths, "smoltalk", ("messages",))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        conversation = _conversation(self.rows[index])
        try:
            check_conversation(conversation)
        except ValueError as e:
            raise UserError(f"SmolTalk row {index} in {', '.join(map(str, self.paths))} is malformed ({e}): "
                            f"re-download it with `python -m scripts.dataset chat-data --only smoltalk`") from e
        return conversation

    def __iter__(self):  # batched rows: validate() reads all ~460K conversations in seconds, not minutes
        return map(_conversation, self.rows)


def _conversation(row: dict) -> dict:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
