"""
Sandboxed execution: the calculator tool the engine calls, and an OS-level sandbox for programs (HumanEval
completions).

calculate(expr) never evaluates Python. It parses the expression with `ast` and walks an allow-list:
numbers, + - * / // % **, unary +/-, parentheses, and `'literal'.count('literal')`. Every operation is
bounded (input length, magnitude of every intermediate result, exponent size), so the work done is tiny by
construction and no timer is needed; a wall-clock deadline checked at every node is a second line of
defence. There is no SIGALRM (which only works on the main thread, nanochat#145), so it is safe to call
from any thread.

run_sandboxed(code) runs a program under bubblewrap (`bwrap`), as code-execution services do: fresh user, PID,
network, mount and IPC namespaces (no network; a /proc that shows only the sandbox; everything dies with the
namespace's init, which is killed at the wall-clock limit), a read-only view of /usr and the Python
installation only, a private size-capped /tmp, an empty environment, no capabilities, and a seccomp filter
that refuses new processes, so the address-space limit bounds the memory of the whole tree. The Python-level
guards of the old subprocess sandbox (rlimits, refused open-for-write outside the cwd, no sockets, no
subprocesses) stay as an inner layer; with `unsafe_exec` they are the only one.
"""

import ast
import errno
import functools
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nanopipe.common import UserError

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


MAX_OUTPUT_BYTES = 1 << 20    # we read at most this much of stdout/stderr
MAX_FILE_BYTES = 16 << 20     # RLIMIT_FSIZE: caps every file the program writes, stdout/stderr included
MAX_OPEN_FILES = 64           # RLIMIT_NOFILE: also bounds pipe and socket buffers, which are not address space
SCRATCH_BYTES = 16 << 20      # the private writable /tmp inside the sandbox (a size-capped tmpfs)
SANDBOX_PACKAGE = "bubblewrap"

# Runs in the child before the user's program: the inner, Python-level layer. Limits are set here rather than
# in a preexec_fn because preexec_fn can deadlock when the parent has threads (the engine may run in a worker
# thread). argv: program path, address-space bytes, cpu seconds, file-size bytes, open files.
_RUNNER = r'''
import builtins, io, os, resource, sys
program_path, as_bytes, cpu_s, fsize, nofile = sys.argv[1], *map(int, sys.argv[2:6])
with open(program_path, encoding="utf-8") as f:
    source = f.read()
for limit, value in ((resource.RLIMIT_AS, as_bytes), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 1),
                     (resource.RLIMIT_MSGQUEUE, 0), (resource.RLIMIT_MEMLOCK, 0)):
    resource.setrlimit(limit, (value, value))

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

# The seccomp filter bwrap loads before it starts the program. Denied with EPERM:
#   - creating processes or threads: the program is one task, so RLIMIT_AS bounds the memory of the whole
#     tree (per-process limits alone let forks multiply it, and RLIMIT_NPROC does not bind uid 0);
#   - new namespaces and mounts, which could undo the file system view;
#   - memory that is not address space (memfd, SysV shm, io_uring rings);
#   - reaching into other processes or the kernel (ptrace, bpf, perf, keyrings, userfaultfd).
_DENIED_SYSCALLS = {
    "x86_64": {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "unshare": 272, "setns": 308, "mount": 165,
               "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
               "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
               "memfd_create": 319, "shmget": 29, "io_uring_setup": 425, "userfaultfd": 323, "ptrace": 101,
               "process_vm_readv": 310, "process_vm_writev": 311, "bpf": 321, "perf_event_open": 298,
               "keyctl": 250, "add_key": 248, "request_key": 249},
    "aarch64": {"clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
                "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430,
                "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "memfd_create": 279,
                "shmget": 194, "io_uring_setup": 425, "userfaultfd": 282, "ptrace": 117, "process_vm_readv": 270,
                "process_vm_writev": 271, "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
                "request_key": 218},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000


def seccomp_filter(machine: str) -> bytes:
    """The classic-BPF seccomp program (struct sock_filter[]) for `machine` (platform.machine())."""
    def insn(code, jt, jf, k):
        return struct.pack("=HBBI", code, jt, jf, k)
    load_word, jump_eq, jump_ge, ret = 0x20, 0x15, 0x35, 0x06   # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ...|JGE|K, BPF_RET|K
    kill, allow, eperm = 0x80000000, 0x7FFF0000, 0x00050000 | errno.EPERM   # SECCOMP_RET_KILL_PROCESS, ...
    denied = sorted(_DENIED_SYSCALLS[machine].values())
    prog = [insn(load_word, 0, 0, 4),                          # seccomp_data.arch
            insn(jump_eq, 1, 0, _AUDIT_ARCH[machine]),
            insn(ret, 0, 0, kill),                             # another ABI (i386 on x86_64): no way round it
            insn(load_word, 0, 0, 0)]                          # seccomp_data.nr
    if machine == "x86_64":
        prog.append(insn(jump_ge, len(denied) + 1, 0, _X32_SYSCALL_BIT))   # the x32 ABI: refuse
    for i, nr in enumerate(denied):
        prog.append(insn(jump_eq, len(denied) - i, 0, nr))
    prog += [insn(ret, 0, 0, allow), insn(ret, 0, 0, eperm)]
    return b"".join(prog)


def _python_in_sandbox():
    """The base interpreter (not a venv's) and the host folders it needs, read-only."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(exe))}
    return exe, sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/"))


def _bwrap_args(program_path):
    """What the program sees: /usr and the Python installation read-only, a fresh /proc of its own PID
    namespace, a minimal read-only /dev, a private size-capped /tmp as cwd; no home, no /etc, no /run, no host
    /tmp, no network, no environment, no capabilities."""
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):   # merged /usr: symlinks; else directories
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    _, prefixes = _python_in_sandbox()
    for prefix in prefixes:
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--remount-ro", "/proc",   # read-only: uid 0 in the sandbox is uid 0 outside
             "--dev", "/dev", "--remount-ro", "/dev",      # read-only: no unbounded /dev/shm
             "--size", str(SCRATCH_BYTES), "--tmpfs", "/tmp",
             "--ro-bind", program_path, "/program.py",
             "--remount-ro", "/", "--chdir", "/tmp"]
    return args


def _sandbox_problem():
    if not sys.platform.startswith("linux"):
        return "the code sandbox needs Linux (bubblewrap)"
    if platform.machine() not in _DENIED_SYSCALLS:
        return f"the code sandbox has no seccomp filter for {platform.machine()}"
    if shutil.which("bwrap") is None:
        return (f"the code sandbox needs the '{SANDBOX_PACKAGE}' package (bwrap): "
                f"sudo apt-get install {SANDBOX_PACKAGE} (or dnf/pacman install {SANDBOX_PACKAGE})")
    probe = _run("print(6 * 7)", timeout_s=30.0, memory_mb=256, unsafe_exec=False)
    if probe.stdout != "42\n":
        detail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"bwrap is installed but cannot start a sandbox here ({detail}); are user namespaces disabled?"
    return None


@functools.cache
def sandbox_problem() -> str | None:
    """Why generated code cannot run sandboxed on this machine, or None when it can (checked once)."""
    return _sandbox_problem()


def require_sandbox():
    problem = sandbox_problem()
    if problem is not None:
        raise UserError(f"{problem}; or pass --unsafe-exec to run generated code with only Python-level guards")


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


def _sandbox_init(info_fd, timeout_s):
    """A pidfd of the sandbox's PID-namespace init, from bwrap's --info-fd JSON; None when bwrap failed first."""
    data, deadline = b"", time.monotonic() + timeout_s
    while b"}" not in data and select.select([info_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return os.pidfd_open(json.loads(data)["child-pid"])
    except (ValueError, KeyError, ProcessLookupError):
        return None


def _read_capped(path):
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")


def run_sandboxed(code: str, timeout_s: float = 5.0, memory_mb: int = 256, unsafe_exec: bool = False) -> ExecResult:
    """Run `code` as a Python program; success means exit status 0 within the time limit.

    Sandboxed (the default) it runs under bubblewrap: its own user, PID, network, mount, IPC and UTS
    namespaces, the file system view of _bwrap_args, the seccomp filter above (one task: `memory_mb` of address
    space bounds the whole tree, plus SCRATCH_BYTES of /tmp), no environment, and a wall-clock kill of the
    namespace's init, which takes every process in it along. UserError when the sandbox is unavailable.
    `unsafe_exec` runs it as a plain `python -I` child with only the rlimits, the Python-level guards and a
    process-group kill (the behaviour before the sandbox; Python code can get round the guards).
    """
    if not unsafe_exec:
        require_sandbox()
    return _run(code, timeout_s, memory_mb, unsafe_exec)


def _run(code, timeout_s, memory_mb, unsafe_exec):
    root = tempfile.mkdtemp(prefix="nanopipe_sandbox_")
    info_r = info_w = filter_fd = pidfd = None
    try:
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        limits = [str(memory_mb << 20), str(max(1, math.ceil(timeout_s)) + 1), str(MAX_FILE_BYTES),
                  str(MAX_OPEN_FILES)]
        if unsafe_exec:
            cwd = os.path.join(root, "work")
            os.mkdir(cwd)
            env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1"}
            cmd, fds = [sys.executable, "-I", "-c", _RUNNER, program_path, *limits], ()
        else:
            cwd, env = root, {}
            filter_path = os.path.join(root, "seccomp.bpf")
            with open(filter_path, "wb") as f:
                f.write(seccomp_filter(platform.machine()))
            filter_fd = os.open(filter_path, os.O_RDONLY)
            info_r, info_w = os.pipe()
            exe, _ = _python_in_sandbox()
            cmd = [shutil.which("bwrap"), *_bwrap_args(program_path), "--seccomp", str(filter_fd),
                   "--info-fd", str(info_w), "--", exe, "-I", "-c", _RUNNER, "/program.py", *limits]
            fds = (filter_fd, info_w)
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, pass_fds=fds)
            start = time.monotonic()
            if not unsafe_exec:
                os.close(info_w)
                info_w = None
                pidfd = _sandbox_init(info_r, timeout_s)
            timed_out = not _wait_unreaped(proc.pid, max(0.0, timeout_s - (time.monotonic() - start)))
            if timed_out and pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)   # the namespace's init: all of it dies
            # the leader is exited-but-unreaped (or still running), so its pid, which is the group id,
            # cannot have been reused: killing the group now only hits the program and its children
            _kill_group(proc.pid)
            returncode = proc.wait()
            if pidfd is not None:
                # the init's exit is reported only once every process of its namespace is gone
                select.select([pidfd], [], [], 30.0)
        stdout = _read_capped(os.path.join(root, "stdout"))
        stderr = _read_capped(os.path.join(root, "stderr"))
        if returncode < 0 and not timed_out:
            stderr += f"\nkilled by signal {-returncode}"
        return ExecResult(success=(returncode == 0 and not timed_out), stdout=stdout, stderr=stderr,
                          timed_out=timed_out)
    finally:
        for fd in (info_r, info_w, filter_fd, pidfd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
