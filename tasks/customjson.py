"""
CustomJSON: your own conversations from a .jsonl file, e.g. identity data ("who made you?") mixed into SFT
(nanochat's identity_conversations.jsonl, Discussion #139). Each line is either a list of messages or an
object {"messages": [...]}, in the brief's conversation format. The whole file is checked when loaded, so a
malformed line fails before training starts, naming the file and line.
"""

from nanopipe.common import UserError
from nanopipe.tokenizer import check_conversation
from tasks.chat_data import chat_data_file
from tasks.common import JsonlRows, Task, require_file


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, path=None, name: str | None = None):
        """`path` defaults to the downloaded identity conversations (<base>/chat_data/identity/)."""
        if path is None:
            path = chat_data_file("identity", "identity_conversations.jsonl")
        path = require_file(path, "conversations", "check the path")
        self.name = name or path.stem
        self.conversations = []
        rows = JsonlRows(path)
        for index, row in enumerate(rows):
            conversation = {"messages": row} if isinstance(row, list) else row
            try:
                check_conversation(conversation)
            except ValueError as e:
                raise UserError(f"{rows.where(index)}: malformed conversation ({e}): each line must be a list "
                                f"of messages or {{\"messages\": [...]}}, user/assistant alternating") from None
            self.conversations.append({"messages": conversation["messages"]})

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
