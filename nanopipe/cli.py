"""Command-line validation at the door: every stage's flags are range-checked where argparse parses them.

    from nanopipe import cli
    p = cli.ArgumentParser(prog="python -m scripts.x")
    p.add_argument("--depth", type=cli.integer(1, 1024), default=20)
    p.add_argument("--eval-every", type=cli.integer(1, allow=((-1, "never"),)), default=250)
    p.add_argument("--warmup-ratio", type=cli.fraction(), default=0.0)                # in [0, 1]
    p.add_argument("--model-tag", type=cli.name, default=None)                        # one plain folder name
    cli.old_spelling(p, p.add_argument("--eval-tokens", type=cli.integer(1)), "--split-tokens")  # hidden old name

A bad value is one line, `error: argument --depth: ...`, and exit code 2, before anything is read or written.
"""

import argparse
import math
import re
import sys

INT64_MAX = 2**63 - 1
SEED_MAX = 2**63 - 1  # torch.manual_seed's signed range; numpy and python take it modulo their own widths
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with nanopipe's error convention: one `error:` line (no usage block), exit code 2."""

    def error(self, message):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _or(allow) -> str:
    return "".join(f" (or {a:g} for {meaning})" for a, meaning in allow)


def _ranged(convert, kind, bound_format, low, high, low_open, allow):
    """A parser of `convert`ed values in [low, high] ((low, high] with low_open) or among `allow`'s sentinels;
    `kind` names the type in messages ("an integer"), bounds are shown with `bound_format`."""
    sentinels = {a for a, _ in allow}

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if value in sentinels:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is too small: use {kind} {'>' if low_open else '>='} "
                                             f"{low:{bound_format}}{_or(allow)}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is too large: use {kind} <= {high:{bound_format}}{_or(allow)}")
        return value

    return parse


def integer(low=None, high=INT64_MAX, allow=()):
    """An int in [low, high] (high defaults to what int64 holds); `allow`: (sentinel, meaning) pairs, e.g.
    ((-1, "never"),), accepted besides the range."""
    parse = _ranged(int, "an integer", ",", low, high, False, allow)
    parse.__name__ = "integer"  # argparse names the type in its "invalid integer value" messages
    return parse


def real(low=None, high=None, low_open=False, allow=()):
    """A finite float in [low, high] ((low, high] with low_open); `allow` as for `integer`."""
    parse = _ranged(float, "a number", "g", low, high, low_open, allow)
    parse.__name__ = "number"
    return parse


def positive(allow=()):
    """A finite float > 0 (learning rates, budgets, ratios)."""
    return real(0.0, low_open=True, allow=allow)


def nonnegative():
    """A finite float >= 0."""
    return real(0.0)


def fraction():
    """A probability or share of a run: a finite float in [0, 1]."""
    return real(0.0, 1.0)


def seed(text):
    """An RNG seed: an integer every RNG we seed accepts (torch's is the narrowest)."""
    return integer(0, SEED_MAX)(text)


def name(text):
    """A tag or dataset name: one plain folder name, so a path built from it stays inside the base dir."""
    if not NAME.fullmatch(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain name: use letters, digits and . _ + - (no / or leading dot), e.g. d12")
    return text


def check_name(text, what: str) -> str:
    """`name` for values that do not come from a flag (e.g. $NANOPIPE_DATA); raises ValueError."""
    try:
        return name(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{what}: {e}") from None


def weights(text):
    """Comma-separated mixture weights: finite, >= 0, with a positive sum."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 70,30") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text}: weights must be finite numbers >= 0 with a positive sum, e.g. 70,30")
    return values


def choices_list(choices):
    """A comma-separated subset of `choices` (e.g. --only gsm8k,mmlu), order kept, at least one."""
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose one or more of {','.join(choices)}")
        return values

    parse.__name__ = "list"
    return parse


def old_spelling(parser, action, *old: str):
    """Accept `old`, what `action`'s flag was called before, for one release (users' scripts keep working);
    --help shows only the new name."""
    parser.add_argument(*old, dest=action.dest, type=action.type, choices=action.choices,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


# the meaning of -1 where a flag takes it
AUTO = ((-1, "auto"),)
NEVER = ((-1, "never"),)
ALL = ((-1, "all"),)
LAST = ((-1, "only the last"),)


def utf8_text(text):
    """Free text from the command line; bytes that were not UTF-8 reach Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not UTF-8 text: use a UTF-8 terminal or locale (e.g. LANG=C.UTF-8)") from None
    return text
