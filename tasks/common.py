"""
What every chat task shares: the Task sequence (index, slice, shuffle), the SFT mixture, the
multiple-choice prompt format, answer extraction for generative scoring, and loading local files.

A task is a sequence of conversations `{"messages": [...]}` (the brief's format). Eval items carry what
scoring needs on top:
- categorical tasks (eval_type "categorical"): `letters` (the allowed answer letters) and `answer` (the
  gold letter); chat_eval scores them by the argmax over the letters' logits at the answer position.
- generative tasks (eval_type "generative"): `task.evaluate(conversation, completion_text) -> bool`.
Eval tasks also carry `baseline`, the accuracy of chance (ChatCORE centers each task's accuracy on it).
"""

import json
import random
import re
from pathlib import Path

from nanopipe.common import UserError, iter_text_lines
from nanopipe.tokenizer import check_conversation
from tasks.chat_data import CHAT_DATA_COMMAND, chat_data_file


class Task:
    """A sequence of conversations. Subclasses set `name`, `eval_type`, and implement
    `num_examples()` and `get_example(index)`; indexing, slicing and shuffling come from here."""

    name = "task"
    eval_type = "generative"   # or "categorical"

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Default for categorical tasks: the completion is the gold letter. Generative tasks override."""
        if self.eval_type != "categorical":
            raise NotImplementedError(f"{self.name} has no generative scoring")
        return completion.strip() == conversation["answer"]

    def check_example(self, example: dict):
        """Raise ValueError unless `example` is usable: a well-formed conversation, plus what scoring reads."""
        check_conversation(example)
        if self.eval_type == "categorical":
            letters = example.get("letters")
            if (not isinstance(letters, list) or not all(isinstance(x, str) for x in letters)
                    or example.get("answer") not in letters):
                raise ValueError("a multiple-choice item needs 'letters' (strings) and an 'answer' among them")

    def where(self, index: int) -> str:
        """Where example `index` comes from, for error messages: file:line for .jsonl, file and row for parquet."""
        rows = getattr(self, "rows", None)
        return rows.where(index) if hasattr(rows, "where") else f"{self.name} example {index}"

    def validate(self):
        """Check every example before training or scoring starts; a bad one is a UserError naming where it is."""
        examples = iter(self)
        for index in range(len(self)):
            try:  # building the example (a row of the wrong type) fails as often as checking it
                self.check_example(next(examples))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problem = f"no field {e}" if isinstance(e, KeyError) else str(e)
                raise UserError(f"{self.where(index)}: malformed {self.name} example ({problem}): fix the file, "
                                "or delete it and download or generate it again") from None

    def __len__(self) -> int:
        return self.num_examples()

    def __getitem__(self, key):
        if isinstance(key, slice):
            return TaskView(self, range(len(self))[key])
        n = len(self)
        index = key + n if key < 0 else key
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {key} out of range for {n} examples")
        return self.get_example(index)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get_example(i)

    def shuffled(self, seed: int) -> "TaskView":
        """The same examples in a deterministic random order."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return TaskView(self, order)


class TaskView(Task):
    """A re-indexed window onto another task (a slice or a shuffle); scoring is the base task's."""

    def __init__(self, base: Task, indices):
        self.base = base
        self.indices = indices          # a range (slices) or a list (shuffles): never copies examples
        self.name = base.name
        self.eval_type = base.eval_type

    def num_examples(self):
        return len(self.indices)

    def get_example(self, index):
        return self.base.get_example(self.indices[index])

    def check_example(self, example):
        self.base.check_example(example)

    def where(self, index):
        return self.base.where(self.indices[index])

    def evaluate(self, conversation, completion):
        return self.base.evaluate(conversation, completion)


class TaskMixture(Task):
    """Several tasks as one SFT sequence, in one deterministic shuffle (nanochat: Random(42)).

    `tasks_with_epochs`: tasks, or (task, epochs) pairs. Epochs may be fractional: 2 means every example
    twice, 0.5 the first half of the task (so a weight below 1 subsamples deterministically).
    """

    name = "mixture"

    def __init__(self, tasks_with_epochs, seed: int = 42):
        self.tasks, index = [], []
        for entry in tasks_with_epochs:
            task, epochs = entry if isinstance(entry, tuple) else (entry, 1)
            if epochs < 0:
                raise ValueError(f"{task.name}: epochs must be >= 0, got {epochs}")
            task_id = len(self.tasks)
            self.tasks.append(task)
            n = len(task)
            whole, fraction = divmod(epochs, 1)
            count = int(whole) * n + round(fraction * n)
            index.extend((task_id, i % n) for i in range(count))
        random.Random(seed).shuffle(index)
        self.index = index

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        task_id, i = self.index[index]
        return self.tasks[task_id][i]


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt: the letter follows its choice (`- Paris=A`), because a small
    model predicts the letter better after having read the choice than before it."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters, choices, answer: str) -> dict:
    """A categorical item: the rendered question, the gold letter as the reply, and the scoring fields."""
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), "answer": answer}


# -----------------------------------------------------------------------------
# generative scoring

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in `text`, commas removed ("1,234.50" -> "1234.50"); None if there is none."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a, b) -> bool:
    """Numeric equality of two number texts/values ("18" == "18.0" == 18); False if either is not a number."""
    try:
        return float(str(a).replace(",", "")) == float(str(b).replace(",", ""))
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# local files

def require_file(path, what: str, fix: str = f"run `{CHAT_DATA_COMMAND}` first") -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no {what} file at {path}: {fix}")
    return path


def chat_file(path, name: str, default: str) -> Path:
    """`path` if given (it must exist), else the chat-data download's file <base>/chat_data/<name>/<default>."""
    if path is not None:
        return require_file(path, f"{name} data")
    return chat_data_file(name, default)


class ParquetRows:
    """The rows of one or more parquet files, kept as Arrow tables (compact: SmolTalk's ~460K conversations
    stay columnar) and turned into Python dicts one row at a time. A missing or unreadable file is a UserError."""

    def __init__(self, paths, what: str, columns=()):
        """`columns`: the names the task reads; a file without one of them is refused when opened."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        tables = []
        fix = f"delete it and run `{CHAT_DATA_COMMAND} --only {what}` again"
        for path in paths:
            try:
                table = pq.read_table(path)
            except Exception as e:  # pyarrow raises several types for truncated/corrupt files
                raise UserError(f"cannot read {what} file {path} ({type(e).__name__}): {fix}") from e
            absent = [c for c in columns if c not in table.column_names]
            if absent:
                raise UserError(f"{what} file {path} has no column {', '.join(absent)} "
                                f"(it has {', '.join(table.column_names)}): {fix}")
            tables.append(table)
        self.paths = list(paths)
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def where(self, index: int) -> str:
        return f"{', '.join(map(str, self.paths))} row {index}"

    def __iter__(self):
        for batch in self.table.to_batches():  # much faster than one slice per row, for validating every row
            yield from batch.to_pylist()

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]


class JsonlRows(list):
    """Every JSON value of a .jsonl file (blank lines skipped), remembering each one's line for messages.
    A line that is not UTF-8 or not JSON is a UserError naming file:line."""

    def __init__(self, path):
        super().__init__()
        self.path, self.lines = Path(path), []
        for line_number, line in iter_text_lines(path):
            if line.strip():
                try:
                    self.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number} is not valid JSON ({e.msg}): fix or regenerate the file") \
                        from None
                self.lines.append(line_number)

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

