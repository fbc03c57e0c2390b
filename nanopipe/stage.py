"""The behaviour every stage script shares: one-line errors, timing, and its report section.

    with Stage("tok_train", args) as stage:
        ...                                   # raise UserError for anything the user can fix
        stage.report(markdown, data, series)
"""

import shlex
import sys
from pathlib import Path

from nanopipe import report as _report
from nanopipe.common import Timer, UserError, debug_enabled, is_rank0


class Stage:
    def __init__(self, name: str, args=None, report: bool = True):
        """`report=False` for tools that only want the error handling (e.g. chat_cli)."""
        if report and name not in _report.STAGE_TITLES:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join(_report.STAGE_TITLES)}")
        self.name = name
        self.args = args
        self.has_report = report
        self.timer = Timer()

    def __enter__(self):
        self.timer.__enter__()
        return self

    def report(self, markdown: str, data: dict, series: dict | None = None):
        """Write this stage's report section (rank 0 only); `seconds` is the stage's wall time so far."""
        if not self.has_report:
            raise ValueError(f"{self.name} was opened with report=False")
        if not is_rank0():
            return
        config = dict(vars(self.args)) if self.args is not None else {}
        _report.write_section(self.name, markdown, data, series=series, config=config,
                             seconds=self.timer.seconds, command=command_line())

    def __exit__(self, exc_type, exc, tb):
        self.timer.__exit__()
        if exc_type is None:
            return False
        if issubclass(exc_type, UserError) and not debug_enabled():
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        if issubclass(exc_type, KeyboardInterrupt):
            print(f"\n{self.name}: interrupted; rerun the same command (with --resume where offered) to continue",
                  file=sys.stderr)
            sys.exit(130)
        return False


def command_line() -> str:
    """How this process was started, as the user would type it (`python -m scripts.x --flag ...`)."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.parent.name in ("scripts", "nanopipe"):
        head = f"python -m {script.parent.name}.{script.stem}"
    else:
        head = " ".join([Path(sys.executable).name, sys.argv[0]])
    return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])
