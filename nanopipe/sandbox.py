"""An OS-level sandbox for programs the model wrote (HumanEval completions): run_sandboxed(code).

It runs a program under bubblewrap (`bwrap`), as code-execution services do: fresh user, PID, network, mount
and IPC namespaces (no network; a /proc that shows only the sandbox; everything dies with the namespace's init,
which is killed at the wall-clock limit), a read-only view of /usr and the Python installation only, a private
size-capped /tmp, an empty environment, no capabilities, and a seccomp filter that refuses new processes, so
the address-space limit bounds the memory of the whole tree. The Python-level guards of the old subprocess
sandbox (rlimits, refused open-for-write outside the cwd, no sockets, no subprocesses) stay as an inner layer;
with `unsafe_exec` they are the only one.
"""

import errno
import functools
import json
import math
import os
import platform
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
