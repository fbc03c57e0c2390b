"""Progress of a long loop, readable on a terminal and in a log file.

On a terminal it is a tqdm bar. Written to a file or a pipe (`> log 2>&1`, tee, screen -L) a bar's carriage-return
redraws would fill the log with half lines, so there it is plain lines instead: one each time the loop has gone
10 % further and 30 s have passed (whichever comes later; without a known total, every 30 s), and a final one.

    with Progress(len(items), "CORE hellaswag", unit="prompts") as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

Training steps print a line every step instead (nanopipe.train_step.StepProgress): there the lines are the log.
"""

import sys
import time

from tqdm import tqdm

from nanopipe.common import format_bytes, format_duration

EVERY_FRACTION = 0.1  # of the total, at least, between two lines in a file
EVERY_SECONDS = 30.0  # at least, between two lines in a file


def interactive(stream) -> bool:
    """Whether `stream` is a terminal, where a bar redraws in place."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Progress:
    """A count towards `total` (None: unknown) in `unit`s (`nbytes`: shown as KB, MB, ...). enabled=False shows
    nothing (ranks other than 0, show_progress=False). leave=False: a bar that disappears when done, and in a
    file no final line unless the loop was long enough to print a line before it (the caller says the result)."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "items", enabled: bool = True,
                 leave: bool = True, nbytes: bool = False, stream=None, every_fraction: float = EVERY_FRACTION,
                 every_seconds: float = EVERY_SECONDS):
        self.stream = stream or sys.stderr  # where tqdm draws
        self.total, self.desc, self.unit, self.nbytes, self.leave = total, desc, unit, nbytes, leave
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.lines = enabled and not interactive(self.stream)
        self.bar = None
        if enabled and not self.lines:
            self.bar = tqdm(total=total, desc=desc, unit="B" if nbytes else unit, unit_scale=nbytes,
                            unit_divisor=1024 if nbytes else 1000, leave=leave, file=self.stream, dynamic_ncols=True)
        self.n = self.line_n = 0
        self.t0 = self.line_time = time.monotonic()
        self.printed = self.closed = False

    def update(self, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            now = time.monotonic()
            far_enough = not self.total or self.n - self.line_n >= self.every_fraction * self.total
            if far_enough and now - self.line_time >= self.every_seconds:
                self._line(now)

    def set_description(self, desc: str):
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)

    def _count(self, n) -> str:
        return format_bytes(n) if self.nbytes else f"{n:,} {self.unit}"

    def _line(self, now, final=False):
        elapsed = now - self.t0
        text = f"{self.desc}: {self._count(self.n)}"
        if self.total:
            text += f" of {self._count(self.total)} ({100 * self.n / self.total:.0f}%)"
        if final:
            text += f", done in {format_duration(elapsed)}"
        else:
            text += f", {format_duration(elapsed)}"
            if self.total and self.n:
                text += f", eta {format_duration(elapsed * (self.total - self.n) / self.n)}"
        print(text, file=self.stream, flush=True)
        self.line_n, self.line_time, self.printed = self.n, now, True

    def close(self, done: bool = True):
        """The bar closes; in a file the final line, unless the loop did not finish (done=False)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines and done and (self.leave or self.printed):
            self._line(time.monotonic(), final=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(done=exc_type is None)
        return False


def track(iterable, desc: str, unit: str = "items", enabled: bool = True, leave: bool = True):
    """The items of `iterable` (a sized one), counted by a Progress as the loop takes them."""
    with Progress(len(iterable), desc, unit, enabled, leave) as progress:
        for item in iterable:
            yield item
            progress.update()
