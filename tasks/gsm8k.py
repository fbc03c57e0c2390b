"""
GSM8K (openai/gsm8k, main): grade-school word problems, for SFT (train) and generative eval (test).

The reference solutions carry calculator annotations, `48/2 = <<48/2=24>>24 clips`; each becomes a tool
call in the assistant's reply: text "48/2 = ", python "48/2", python_output "24", text "24 clips". That
is where the model learns to use the calculator (nanochat#459). Scoring: the number after `####` in the
reference against the last number of the completion.
"""

import re

from tasks.common import JsonlRows, ParquetRows, Task, chat_file, last_number, same_number

_ANNOTATION = re.compile(r"(<<[^<>]*>>)")


def solution_parts(solution: str) -> list[dict]:
    """A GSM8K solution as assistant content parts, one python/python_output pair per <<expr=result>>."""
    parts = []
    for piece in _ANNOTATION.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not expr:  # an annotation without "=": keep it as a call whose output the engine will supply
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def final_answer(solution: str) -> str:
    """The number after `####`, without thousands separators ("#### 1,000" -> "1000")."""
    return solution.rpartition("####")[2].strip().replace(",", "")


class GSM8K(Task):
    name = "GSM8K"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, split: str = "train", path=None):
        """`path`: a parquet file in the HF layout, or a .jsonl of {question, answer} (the original release)."""
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        path = chat_file(path, "gsm8k", f"main/{split}-00000-of-00001.parquet")
        self.rows = JsonlRows(path) if path.suffix == ".jsonl" else ParquetRows([path], "gsm8k", ("question", "answer"))

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": solution_parts(row["answer"])}],
                "answer": final_answer(row["answer"])}

    def evaluate(self, conversation, completion):
        return same_number(last_number(completion), conversation["answer"])
