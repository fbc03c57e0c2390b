"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete; generative eval (baseline 0).

The model sees the prompt (signature + docstring) and should reply with the whole function. Scoring runs
the first fenced code block of the completion (or all of it), after the prompt's imports, followed by the
problem's tests and `check(entry_point)`, in nanopipe.sandbox (bubblewrap: namespaces, a read-only
view, no network, time and memory limits); it passes iff the program exits cleanly. Without bubblewrap the task
refuses to load unless `unsafe_exec` (chat_eval --unsafe-exec) accepts running the code with only Python-level
guards.
"""

import re

from nanopipe.sandbox import require_sandbox, run_sandboxed
from tasks.common import JsonlRows, ParquetRows, Task, chat_file

TIMEOUT_S = 5.0
MEMORY_MB = 256
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, or the completion itself when it has none."""
    match = _CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def prompt_imports(prompt: str) -> str:
    """The prompt's import lines: a completion that restates only the function still needs them."""
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


def build_program(conversation: dict, completion: str) -> str:
    return "\n\n".join([prompt_imports(conversation["prompt"]), extract_code(completion), conversation["test"],
                        f"check({conversation['entry_point']})\n"])


COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


class HumanEval(Task):
    name = "HumanEval"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, path=None, unsafe_exec=False):
        """`path`: the HF parquet, or a .jsonl of problems (the original release's format)."""
        if not unsafe_exec:
            require_sandbox()  # refuse before any generation, not at the first completion
        self.unsafe_exec = unsafe_exec
        path = chat_file(path, "humaneval", "openai_humaneval/test-00000-of-00001.parquet")
        self.rows = JsonlRows(path) if path.suffix == ".jsonl" else ParquetRows([path], "humaneval", COLUMNS)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                "entry_point": row["entry_point"]}

    def evaluate(self, conversation, completion):
        return run_sandboxed(build_program(conversation, completion), TIMEOUT_S, MEMORY_MB, self.unsafe_exec).success
