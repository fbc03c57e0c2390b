"""
Sandboxed execution: the calculator tool the engine calls, and a subprocess sandbox for programs
(HumanEval completions).

calculate(expr) never evaluates Python. It parses the expression with `ast` and walks an allow-list:
numbers, + - * / // % **, unary +/-, parentheses, and `'literal'.count('literal')`. Every operation is
bounded (input length, magnitude of every intermediate result, exponent size), so the work done is tiny by
construction and no timer is needed; a wall-clock deadline checked at every node is a second line of
defence. There is no SIGALRM (which only works on the main thread, nanochat#145), so it is safe to call
from any thread.

run_sandboxed(code) runs a program in a fresh `python -I` process: own session/process group (killed as a
whole on timeout and at exit, so stray children die too), resource limits (address space, CPU seconds,
file size), a fresh temp dir as cwd, network and subprocess creation disabled and writes outside the cwd
refused by a small prelude. The prelude is best effort (Python code can reach libc through ctypes); the
OS-level limits and the process-group kill are what bound the damage.
"""

import ast
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# Calculator

MAX_EXPR_CHARS = 256          # longer inputs are refused outright
MAX_ABS_INT = 10 ** 100       # any intermediate integer beyond this is refused
MAX_POW_EXPONENT = 1024       # |exponent| of ** beyond this is refused
MAX_STR_CHARS = 256           # string literals for .count()
CALC_DEADLINE_S = 0.1         # belt and braces: the walk is bounded anyway

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
    if time.monotonic() > deadline:
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


def calculate(expr: str) -> str | None:
    """Evaluate a calculator expression; the result as text, or None when refused (never raises)."""
    try:
        if not isinstance(expr, str):
            return None
        expr = expr.replace(",", "").strip()
        if not expr or len(expr) > MAX_EXPR_CHARS:
            return None
        tree = ast.parse(expr, mode="eval")
        return format_number(_eval_node(tree, time.monotonic() + CALC_DEADLINE_S))
    except Exception:  # _Refused, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, ...
        return None


# -----------------------------------------------------------------------------
# Program sandbox

@dataclass
class ExecResult:
    success: bool
    stdout: str
    stderr: str
    timed_out: bool


MAX_OUTPUT_BYTES = 1 << 20    # stdout/stderr files are capped by RLIMIT_FSIZE; we read at most this much

# Runs in the child before the user's program. Limits are set here rather than in a preexec_fn because
# preexec_fn can deadlock when the parent has threads (the engine may run in a worker thread).
# argv: program path, address-space bytes, cpu seconds, file-size bytes.
_RUNNER = r'''
import builtins, io, os, resource, sys
program_path, as_bytes, cpu_s, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(program_path, encoding="utf-8") as f:
    source = f.read()
resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

workdir = os.path.realpath(os.getcwd())

def _inside(path):
    if isinstance(path, int):
        return True  # an already-open file descriptor
    real = os.path.realpath(os.fsdecode(path))
    return real == workdir or real.startswith(workdir + os.sep)

def _refuse(*args, **kwargs):
    raise PermissionError("disabled in the sandbox")

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the working directory: {file}")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_os_open = os.open
def _guarded_os_open(path, flags, *args, **kwargs):
    writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
    if writing and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the working directory: {path}")
    return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open

def _guard_paths(func):
    def guarded(*paths, **kwargs):
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: touching a path outside the working directory: {p}")
        return func(*paths, **kwargs)
    return guarded
for name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "replace", "chmod", "chown",
             "truncate", "symlink", "link", "utime"):
    if hasattr(os, name):
        setattr(os, name, _guard_paths(getattr(os, name)))

# no new processes, no signals to others, no network
import posix, socket, _socket, subprocess, shutil
for module in (os, posix):
    for name in ("fork", "forkpty", "system", "kill", "killpg", "setsid", "setuid", "chroot",
                 "execv", "execve", "execl", "execle", "execlp", "execvp", "execvpe", "posix_spawn",
                 "posix_spawnp", "spawnv", "spawnve", "spawnl", "spawnle", "popen"):
        if hasattr(module, name):
            setattr(module, name, _refuse)
subprocess.Popen = _refuse
shutil.rmtree = _guard_paths(shutil.rmtree)
shutil.move = _guard_paths(shutil.move)
socket.socket = socket.create_connection = socket.socketpair = _socket.socket = _refuse
for name in ("resource", "multiprocessing", "_posixsubprocess"):
    sys.modules[name] = None
del resource

sys.argv = [program_path]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
'''


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_unreaped(pid, timeout_s):
    """Wait until `pid` exits without reaping it (WNOWAIT); False on timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _read_capped(path):
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")


def run_sandboxed(code: str, timeout_s: float = 5.0, memory_mb: int = 256) -> ExecResult:
    """Run `code` as a Python program in a sandbox; success means exit status 0 within the time limit."""
    root = tempfile.mkdtemp(prefix="nanopipe_sandbox_")
    try:
        workdir = os.path.join(root, "work")   # the program's cwd; stdout/stderr files sit beside it
        os.mkdir(workdir)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cpu_s = max(1, math.ceil(timeout_s)) + 1
        cmd = [sys.executable, "-I", "-c", _RUNNER, program_path,
               str(memory_mb * 1024 * 1024), str(cpu_s), str(16 * MAX_OUTPUT_BYTES)]
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            timed_out = not _wait_unreaped(proc.pid, timeout_s)
            # the leader is exited-but-unreaped (or still running), so its pid, which is the group id,
            # cannot have been reused: killing the group now only hits the program and its children
            _kill_group(proc.pid)
            returncode = proc.wait()
        stdout = _read_capped(os.path.join(root, "stdout"))
        stderr = _read_capped(os.path.join(root, "stderr"))
        if returncode < 0 and not timed_out:
            stderr += f"\nkilled by signal {-returncode}"
        return ExecResult(success=(returncode == 0 and not timed_out), stdout=stdout, stderr=stderr,
                          timed_out=timed_out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
