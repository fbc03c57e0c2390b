"""The calculator tool the engine calls: arithmetic and `.count()` on literals, never Python.

calculate(expr) parses the expression with `ast` and walks an allow-list: numbers, + - * / // % **, unary +/-,
parentheses, and `'literal'.count('literal')`. Every operation is bounded (input length, magnitude of every
intermediate result, exponent size), so the work done is tiny by construction and no timer is needed; a
deadline on the thread's CPU time (not the wall clock, which a busy machine or a GIL wait eats into) checked
at every node is a second line of defence. There is no SIGALRM (which only works on the main thread,
nanochat#145), so it is safe to call from any thread.
"""

import ast
import math
import re
import time

MAX_EXPR_CHARS = 256          # longer inputs are refused outright
MAX_ABS_INT = 10 ** 100       # any intermediate integer beyond this is refused
MAX_POW_EXPONENT = 1024       # |exponent| of ** beyond this is refused
MAX_STR_CHARS = 256           # string literals for .count()
CALC_DEADLINE_S = 0.1         # CPU seconds; belt and braces: the walk is bounded anyway

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class _Refused(Exception):
    """The expression is outside what the calculator accepts."""


def _check_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused("not a real number")
    if isinstance(value, int) and abs(value) > MAX_ABS_INT:
        raise _Refused("integer too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("float overflow")
    return value


def _power(base, exponent):
    if abs(exponent) > MAX_POW_EXPONENT:
        raise _Refused("exponent too large")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # estimate the size before computing it: |base|**exp has about bit_length*exp bits
        if abs(base) > 1 and (abs(base).bit_length() - 1) * exponent > MAX_ABS_INT.bit_length():
            raise _Refused("result too large")
    result = base ** exponent
    if isinstance(result, complex):
        raise _Refused("complex result")
    return result


def _eval_node(node, deadline):
    if time.thread_time() > deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, deadline)
    if isinstance(node, ast.Constant):
        return _check_number(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand, deadline)
        return _check_number(-value if isinstance(node.op, ast.USub) else +value)
    if isinstance(node, ast.BinOp):
        left = _eval_node(node.left, deadline)
        right = _eval_node(node.right, deadline)
        if isinstance(node.op, ast.Pow):
            return _check_number(_power(left, right))
        op = _BINARY_OPS.get(type(node.op))
        if op is None:
            raise _Refused(f"operator {type(node.op).__name__}")
        return _check_number(op(left, right))
    if isinstance(node, ast.Call):
        return _eval_count(node)
    raise _Refused(f"node {type(node).__name__}")


def _eval_count(node):
    # exactly: 'literal'.count('literal'), nothing else callable
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "count"
            and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)):
        raise _Refused("only 'string'.count('x') may be called")
    if node.keywords or len(node.args) != 1:
        raise _Refused("count takes one argument")
    arg = node.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        raise _Refused("count argument must be a string literal")
    haystack, needle = func.value.value, arg.value
    if len(haystack) > MAX_STR_CHARS or len(needle) > MAX_STR_CHARS:
        raise _Refused("string too long")
    return haystack.count(needle)


def format_number(value):
    """Integers as integers, floats rounded to 10 decimals with trailing zeros dropped (7.0 -> '7')."""
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"  # also turns -0.0 into 0
    if abs(value) >= 1e15:
        return repr(value)
    if abs(value) < 1e-6:
        return f"{value:.10g}"
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
_GROUPED_NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\w,])")


def _drop_thousands_separators(expr):
    """'1,234,567 * 2' -> '1234567 * 2'. Only groups of three digits count, and never inside a string literal:
    '1,2,3'.count(',') keeps its commas, and (1,2) stays a tuple, which the calculator refuses."""
    code = [_GROUPED_NUMBER.sub(lambda m: m.group().replace(",", ""), part) for part in _STRING_LITERAL.split(expr)]
    return "".join(c + literal for c, literal in zip(code, _STRING_LITERAL.findall(expr) + [""]))


def calculate(expr: str) -> str | None:
    """Evaluate a calculator expression; the result as text, or None when refused (never raises)."""
    try:
        if not isinstance(expr, str):
            return None
        if len(expr) > MAX_EXPR_CHARS:
            return None
        expr = _drop_thousands_separators(expr).strip()
        if not expr:
            return None
        tree = ast.parse(expr, mode="eval")
        return format_number(_eval_node(tree, time.thread_time() + CALC_DEADLINE_S))
    except Exception:  # _Refused, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, ...
        return None
