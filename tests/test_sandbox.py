"""The HumanEval sandbox against hostile programs.

Every attack runs through run_sandboxed and is then checked from outside with real things: files beside a victim
file on the host, loopback servers (TCP, UDP, IPv6, unix path and abstract sockets) that record every connection
or datagram, a sentinel process holding a secret in its environment, a SIGUSR1 handler in this (the evaluator's)
process, a scan of /proc for any process the attack left behind, and a sampler of the sandbox's resident memory.
A few controls run the same attacks with unsafe_exec (Python-level guards only) and show that the checks do catch
an escape.
"""

import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from string import Template

import pytest

from nanopipe import sandbox
from nanopipe.common import UserError
from nanopipe.sandbox import MAX_OUTPUT_BYTES, SCRATCH_BYTES, run_sandboxed
from tasks.humaneval import HumanEval
from tests.conftest import run_main, subprocess_env

REPO = Path(__file__).resolve().parents[1]
MEMORY_MB = 256
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed: sudo apt-get install bubblewrap "
                                        "(.ci/run installs it)")
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine(), -1)  # raw syscall numbers, from the kernel's tables

# what every attack starts with: libc through ctypes (which no Python-level guard stops), and a process name
# (comm) the /proc scan looks for, inherited by any child and set again after any exec
PRELUDE = """\
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"$marker", 0, 0, 0)
def errno():
    return ctypes.get_errno()
"""


# -----------------------------------------------------------------------------
# the outside world the attacks aim at

class Recorder:
    """Loopback servers that record every connection or datagram they get."""

    def __init__(self, sock_dir):
        self.events, self._stop, self._threads = [], threading.Event(), []
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(sock_dir / "server.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        self.abstract_name = "\0nanopipe-test-" + uuid.uuid4().hex
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen()
        servers = [("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)]
        try:
            self.tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
            servers.append(("tcp6", self.tcp6))
        except OSError:
            self.tcp6 = None
        for kind, server in servers:
            self._serve(kind, server, self._accept)
        self._serve("udp", self.udp, lambda s: s.recvfrom(4096))

    def _accept(self, server):
        conn, _ = server.accept()
        conn.close()

    def _serve(self, kind, server, receive):
        server.settimeout(0.1)

        def loop():
            while not self._stop.is_set():
                try:
                    receive(server)
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                self.events.append(kind)
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for s in (self.tcp, self.udp, self.unix, self.abstract, self.tcp6):
            if s is not None:
                s.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Servers, a sentinel process with a secret in its environment, and a SIGUSR1 counter in this process."""
    sock_dir = tmp_path_factory.mktemp("sock")
    recorder = Recorder(sock_dir)
    secret = "nanopipe-secret-" + uuid.uuid4().hex
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                env={"NANOPIPE_TEST_SECRET": secret})
    signals = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: signals.append(signum))
    yield {"recorder": recorder, "secret": secret, "sentinel": sentinel, "signals": signals}
    signal.signal(signal.SIGUSR1, previous)
    sentinel.kill()
    sentinel.wait()
    recorder.close()


@pytest.fixture
def ctx(world, tmp_path):
    """One attack's targets: a victim file, a secret file and a folder on the host, plus everything in `world`."""
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "victim.txt").write_text("precious")
    (outside / "secret.txt").write_text(world["secret"])
    os.chmod(outside / "victim.txt", 0o644)
    rec = world["recorder"]
    return {**world, "outside": outside, "victim": str(outside / "victim.txt"), "new": str(outside / "new.txt"),
            "marker": "npsbx" + uuid.uuid4().hex[:10], "parent": os.getpid(), "pgid": os.getpgid(0),
            "sentinel_pid": world["sentinel"].pid, "tcp_port": rec.tcp.getsockname()[1],
            "tcp6_port": rec.tcp6.getsockname()[1] if rec.tcp6 else 0, "udp_port": rec.udp.getsockname()[1],
            "unix_path": rec.unix_path, "abstract": rec.abstract_name[1:], "home": str(Path.home()),
            "repo": str(REPO), "sys_clone": SYS_CLONE, "site_packages": _site_packages(),
            "pythonpath": ":".join(sys.path)}


def _site_packages():
    import sysconfig
    return sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]


def _tasks_named(marker):
    """Live (not zombie) processes whose name or command line carries `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if state != b"Z" and (marker.encode() in comm or marker.encode() in cmdline):
            found.append(int(entry))
    return found


class MemorySampler:
    """Peak summed RSS of the processes carrying a marker, sampled every few ms from outside."""

    def __init__(self, marker):
        self.marker, self.peak, self._stop = marker, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for pid in _tasks_named(self.marker):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
                except (FileNotFoundError, ProcessLookupError, StopIteration):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.005)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def attack(ctx, code, timeout_s=5.0, late_s=0.0, unsafe_exec=False):
    """Run an attack, then check from outside that nothing got out; returns the result for attack-specific checks."""
    rec, before = ctx["recorder"], len(ctx["recorder"].events)
    program = Template(PRELUDE + code).substitute(ctx)
    t0 = time.monotonic()
    result = run_sandboxed(program, timeout_s=timeout_s, memory_mb=MEMORY_MB, unsafe_exec=unsafe_exec)
    elapsed = time.monotonic() - t0
    if unsafe_exec:
        return result  # the controls check escapes themselves
    assert elapsed < timeout_s + 15, f"run_sandboxed took {elapsed:.1f}s"
    # nothing it started is still running when run_sandboxed returns, nor (late_s) a little later
    assert _tasks_named(ctx["marker"]) == [], result
    if late_s:
        time.sleep(late_s)
        assert _tasks_named(ctx["marker"]) == []
    outside = ctx["outside"]
    assert sorted(p.name for p in outside.iterdir()) == ["keep", "secret.txt", "victim.txt"]
    assert list((outside / "keep").iterdir()) == []
    assert (outside / "victim.txt").read_text() == "precious"
    assert stat.S_IMODE((outside / "victim.txt").stat().st_mode) == 0o644
    time.sleep(0.2)  # let the recorder threads pick up anything in flight
    assert rec.events[before:] == [], f"the attack reached a server: {rec.events[before:]}"
    assert ctx["sentinel"].poll() is None, "the sentinel process was killed"
    assert ctx["signals"] == [], "the evaluator was signalled"
    assert ctx["secret"] not in result.stdout + result.stderr
    return result


def _output(result):
    return result.stdout + result.stderr


# -----------------------------------------------------------------------------
# the checks themselves catch what they are meant to catch

def test_controls_detect_what_they_should(ctx):
    rec = ctx["recorder"]
    n = len(rec.events)
    socket.create_connection(("127.0.0.1", ctx["tcp_port"])).close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", ctx["udp_port"]))
    for address in (ctx["unix_path"], "\0" + ctx["abstract"]):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(address)
    deadline = time.monotonic() + 10
    while len(rec.events) < n + 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(rec.events[n:]) == ["abstract", "tcp", "udp", "unix"]
    del rec.events[n:]
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ctx["signals"] == [signal.SIGUSR1]
    ctx["signals"].clear()
    with open(f"/proc/{ctx['sentinel_pid']}/environ") as f:
        assert ctx["secret"] in f.read()
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", ctx["marker"]])
    try:
        assert _tasks_named(ctx["marker"]) == [marked.pid]
    finally:
        marked.kill()
        marked.wait()


def test_unsafe_exec_lets_attacks_through(ctx):
    """Without the OS layer the Python-level guards are bypassed: the reason the sandbox exists."""
    result = attack(ctx, "import io\nio.FileIO('$new', 'w').write(b'x')\n", unsafe_exec=True)
    assert result.success and os.path.exists(ctx["new"])
    os.unlink(ctx["new"])
    result = attack(ctx, "print(open('/proc/$sentinel_pid/environ', 'rb').read())\n", unsafe_exec=True)
    assert ctx["secret"] in result.stdout
    rec = ctx["recorder"]
    n = len(rec.events)
    result = attack(ctx, "import _socket\ns = _socket.SocketType()\ns.connect(('127.0.0.1', $tcp_port))\n",
                    unsafe_exec=True)
    assert result.success
    deadline = time.monotonic() + 10
    while len(rec.events) == n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.events[n:] == ["tcp"]
    del rec.events[n:]


# -----------------------------------------------------------------------------
# escape attempts: processes that try to outlive the timeout

@needs_bwrap
def test_sandbox_is_available_here():
    assert sandbox.sandbox_problem() is None


ESCAPES = {
    # a setsid grandchild through ctypes that would write a file on the host after the run
    "ctypes_setsid_grandchild": ("""
pid = libc.fork()
if pid == 0:
    libc.setsid()
    if libc.fork() == 0:
        time.sleep(1.5)
        open('$new', 'w').write('late')
    libc._exit(0)
print('fork', pid, errno())
""", r"fork -1 1\b", {"late_s": 2.0}),
    # the real subprocess machinery (Popen -> _fork_exec): a fresh copy of the module, behind the guard's back
    "fork_exec_via_fresh_subprocess": ("""
import importlib.util, subprocess
del sys.modules['_posixsubprocess']
spec = importlib.util.spec_from_file_location('subprocess_again', subprocess.__file__)
fresh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fresh)
assert fresh._fork_exec is not None
Popen = fresh.Popen
try:
    Popen(['/bin/sh', '-c', 'sleep 2; echo late > $new'], start_new_session=True)
    print('spawned')
except OSError as e:
    print('refused', e.errno)
""", r"refused 1\b", {"late_s": 2.5}),
    "libc_system_background": ("print('system', libc.system(b'(sleep 2; echo late > $new) &'))\n",
                               r"system (127|32512)\b", {"late_s": 2.5}),
    "raw_clone_syscall": ("print('clone', libc.syscall($sys_clone, 17, 0, 0, 0, 0), errno())\n",
                          r"clone -1 1\b", {}),
    "raw_clone3_syscall": ("print('clone3', libc.syscall(435, 0, 0), errno())\n", r"clone3 -1 1\b", {}),
    "posix_spawn": ("""
pid = ctypes.c_int(0)
argv = (ctypes.c_char_p * 3)(b'sleep', b'30', None)
print('spawn', libc.posix_spawn(ctypes.byref(pid), b'/usr/bin/sleep', None, None, argv, None))
""", r"spawn [1-9]", {}),
    "threads": ("""
import threading
try:
    threading.Thread(target=time.sleep, args=(30,)).start()
    print('started')
except RuntimeError as e:
    print('refused', e)
""", r"refused", {}),
    "fork_bomb": ("""
made = sum(1 for _ in range(2000) if libc.fork() > 0)
print('forked', made)
""", r"forked 0\b", {}),
    # the old process-group kill did not reach a child that left the group
    "double_fork_new_group": ("""
if libc.fork() == 0:
    libc.setpgid(0, 0)
    time.sleep(30)
print('forked', errno())
""", r"forked 1\b", {}),
    # signals: none may reach the evaluator, its process group, or another process
    "kill_parent": ("print('kill', libc.kill($parent, 10), errno())\n", r"kill -1 3\b", {}),
    "kill_parent_group": ("print('killpg', libc.kill(-$pgid, 10), errno())\n", r"killpg -1 3\b", {}),
    "pidfd_send_signal_parent": ("""
import signal
try:
    fd = os.pidfd_open($parent)
    signal.pidfd_send_signal(fd, signal.SIGKILL)
    print('signalled')
except OSError as e:
    print('pidfd', e.errno)
""", r"pidfd 3\b", {}),
    "kill_sentinel": ("print('kill', libc.kill($sentinel_pid, 9), errno())\n", r"kill -1 3\b", {}),
    "kill_everything": ("print('kill', libc.kill(-1, 9), errno())\n", r"kill ", {}),
    "ptrace_parent": ("print('ptrace', libc.ptrace(16, $parent, 0, 0), errno())\n", r"ptrace -1 [13]\b", {}),
    # files: write, rename, delete, chmod outside the temp dir by every route Python offers
    "io_fileio_write": ("""
import io
try:
    io.FileIO('$new', 'w').write(b'x')
except OSError as e:
    print('refused', e.errno)
""", r"refused \d", {}),
    "posix_open_write": ("""
import posix
try:
    posix.write(posix.open('$victim', posix.O_WRONLY | posix.O_TRUNC), b'gone')
except OSError as e:
    print('refused', e.errno)
""", r"refused \d", {}),
    "posix_rename": ("""
import posix
try:
    posix.rename('$victim', '$outside/keep/moved.txt')
except OSError as e:
    print('refused', e.errno)
""", r"refused \d", {}),
    "posix_unlink_and_rmdir": ("""
import posix
for f, path in ((posix.unlink, '$victim'), (posix.unlink, '$outside/secret.txt'), (posix.rmdir, '$outside/keep')):
    try:
        f(path)
    except OSError as e:
        print('refused', e.errno)
""", r"(refused \d+\s*){3}", {}),
    "posix_chmod": ("""
import posix
try:
    posix.chmod('$victim', 0o777)
except OSError as e:
    print('refused', e.errno)
""", r"refused \d", {}),
    "libc_open_unlink": ("""
print('open', libc.open(b'$new', 0o101, 0o644), errno())
print('unlink', libc.unlink(b'$victim'), errno())
""", r"open -1 \d+\s+unlink -1 \d", {}),
    # the host path rebuilt inside the private /tmp: the writes land there, not on the host
    "rebuild_host_path_in_private_tmp": ("""
import posix
os.makedirs('$outside', exist_ok=True)
fd = posix.open('$victim', posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC)
posix.write(fd, b'overwritten')
print('wrote', open('$victim').read())
""", r"wrote overwritten", {}),
    # poisoning the Python installation or the system would outlive the run
    "poison_site_packages": ("""
import posix
try:
    posix.open('$site_packages/nanopipe_sandbox_escape.pth', posix.O_WRONLY | posix.O_CREAT)
    print('created')
except OSError as e:
    print('refused', e.errno)
""", r"refused 30\b", {}),
    "write_usr_and_root": ("""
import posix
for path in ('/usr/bin/nanopipe-escape', '/escape', '/program.py'):
    try:
        posix.open(path, posix.O_WRONLY | posix.O_CREAT)
        print('created', path)
    except OSError as e:
        print('refused', e.errno)
""", r"(refused 30\s*){3}", {}),
    "write_proc_sys_and_dev_shm": ("""
import posix
for path in ('/proc/sys/kernel/hostname', '/proc/self/attr/current', '/dev/shm/x'):
    try:
        posix.write(posix.open(path, posix.O_WRONLY | posix.O_CREAT), b'x')
        print('wrote', path)
    except OSError as e:
        print('refused', e.errno)
""", r"(refused \d+\s*){3}", {}),
    "mount_and_new_namespaces": ("""
print('mount', libc.mount(b'none', b'/usr', b'tmpfs', 0, None), errno())
print('unshare', libc.unshare(0x10000000 | 0x00020000), errno())
print('chroot', libc.chroot(b'/tmp'), errno())
""", r"mount -1 1\s+unshare -1 1\s+chroot -1 1\b", {}),
    # reading what should stay hidden
    "read_secret_file": ("""
try:
    print(open('$outside/secret.txt').read())
except OSError as e:
    print('refused', e.errno)
""", r"refused 2\b", {}),
    "read_parent_and_sentinel_proc": ("""
for pid in ($parent, $sentinel_pid):
    for name in ('environ', 'cmdline', 'cwd'):
        try:
            print(open(f'/proc/{pid}/{name}', 'rb').read())
        except OSError as e:
            print('refused', e.errno)
""", r"(refused 2\s*){6}", {}),
    "read_every_environ": ("""
import glob
for path in glob.glob('/proc/*/environ'):
    try:
        print(path, open(path, 'rb').read())
    except OSError as e:
        print(path, e.errno)
print('scanned')
""", r"scanned", {}),
    "own_environment": ("import json\nprint(json.dumps(dict(os.environ)))\n", r"^\{", {}),
    "home_and_repo": ("""
import json
seen = []
for root, dirs, files in os.walk('$home'):
    seen += [os.path.join(root, f) for f in files[:3]]
    if len(seen) > 50:
        break
try:
    open('$repo/README.md').read()
    print('read the repo')
except OSError as e:
    print('repo', e.errno)
print(json.dumps(seen))
""", r"repo 2\b", {}),
    "system_secrets": ("""
for path in ('/etc/shadow', '/etc/passwd', '/root/.bash_history', '/var/run/docker.sock', '/run'):
    print(path, os.path.exists(path))
""", r"\A(\S+ False\n){5}\Z", {}),
    # the network: every family, through _socket (SocketType: the inner guard replaced _socket.socket) and libc
    "socket_tcp": ("""
import _socket
for family, address in ((_socket.AF_INET, ('127.0.0.1', $tcp_port)), (_socket.AF_INET6, ('::1', $tcp6_port, 0, 0))):
    try:
        _socket.SocketType(family, _socket.SOCK_STREAM).connect(address)
        print('connected')
    except OSError as e:
        print('refused', e.errno)
""", r"(refused \d+\s*){2}", {}),
    "socket_udp": ("""
import _socket
try:
    _socket.SocketType(_socket.AF_INET, _socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', $udp_port))
    print('sent')
except OSError as e:
    print('refused', e.errno)
""", r"sent|refused \d", {}),  # sent: to the sandbox's own loopback, where nobody listens
    "socket_unix_path_and_abstract": ("""
import _socket
for address in ('$unix_path', '\\0$abstract'):
    try:
        _socket.SocketType(_socket.AF_UNIX, _socket.SOCK_STREAM).connect(address)
        print('connected')
    except OSError as e:
        print('refused', e.errno)
""", r"(refused \d+\s*){2}", {}),
    "libc_socket_connect": ("""
import struct
fd = libc.socket(2, 1, 0)
address = struct.pack('=H', 2) + struct.pack('!H4s8x', $tcp_port, bytes([127, 0, 0, 1]))
print('connect', libc.connect(fd, address, len(address)), errno())
""", r"connect -1 \d", {}),
    # time: no way to outlive the wall clock
    "ignore_signals_and_spin": ("""
import signal
for s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
while True:
    pass
""", None, {"timeout_s": 1.0}),
    "sleep_forever": ("time.sleep(3600)\n", None, {"timeout_s": 1.0}),
    "exec_into_sleep": ("""
argv = (ctypes.c_char_p * 3)(b'$marker', b'3600', None)
libc.execv(b'/usr/bin/sleep', argv)
""", None, {"timeout_s": 1.0}),
    # memory outside the address-space limit
    "memfd_and_shm": ("""
try:
    os.memfd_create('x')
    print('memfd')
except OSError as e:
    print('memfd refused', e.errno)
print('shmget', libc.shmget(0, 200 << 20, 0o1600), errno())
""", r"memfd refused 1\s+shmget -1 1\b", {}),
    "fill_private_tmp": ("""
written = 0
try:
    for i in range(16):
        with open(f'/tmp/fill{i}', 'wb') as f:
            f.write(b'x' * (4 << 20))
        written += 4 << 20
except OSError as e:
    print('stopped', e.errno, written >> 20)
""", r"stopped 28 1[0-6]\b", {}),
    "flood_stdout": ("sys.stdout.write('x' * (64 << 20))\n", None, {}),
}


@needs_bwrap
@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_attempt_is_contained(ctx, name):
    code, expected, options = ESCAPES[name]
    timeout_s = options.get("timeout_s", 5.0)
    result = attack(ctx, code, timeout_s=timeout_s, late_s=options.get("late_s", 0.0))
    if timeout_s < 5.0:
        assert result.timed_out and not result.success
    elif expected is not None:  # the attack ran as far as the step it attempts, and that step failed
        assert re.search(expected, result.stdout, re.MULTILINE), _output(result)
    if name == "own_environment":
        assert set(json.loads(result.stdout)) <= {"PWD", "LC_CTYPE"}
    if name == "home_and_repo":
        prefix = os.path.realpath(sys.base_prefix)
        assert all(os.path.realpath(p).startswith(prefix + os.sep) for p in json.loads(result.stdout.splitlines()[-1]))
    if name == "flood_stdout":
        assert not result.success and len(result.stdout) <= MAX_OUTPUT_BYTES


@needs_bwrap
def test_three_forks_cannot_exceed_the_memory_limit_together(ctx):
    code = """
for _ in range(3):
    pid = libc.fork()
    if pid == 0:
        block = b'x' * (200 << 20)
        print('child allocated', flush=True)
        time.sleep(1)
        libc._exit(0)
    print('fork', pid, flush=True)
block = b'x' * (200 << 20)
print('parent allocated', flush=True)
time.sleep(1)
"""
    sampler = MemorySampler(ctx["marker"])
    try:
        result = attack(ctx, code)
    finally:
        peak = sampler.stop()
    assert result.success and result.stdout.count("fork -1") == 3 and "child allocated" not in result.stdout
    assert "parent allocated" in result.stdout
    assert 150 << 20 < peak <= (MEMORY_MB << 20) + SCRATCH_BYTES, peak


@needs_bwrap
@pytest.mark.parametrize("code", ["block = b'x' * (1 << 30)\n",
                                  "import mmap\nm = mmap.mmap(-1, 1 << 30)\nm[::4096] = b'x' * (1 << 18)\n",
                                  "blocks = [b'x' * (32 << 20) for _ in range(64)]\n"])
def test_one_process_cannot_exceed_the_memory_limit(ctx, code):
    sampler = MemorySampler(ctx["marker"])
    try:
        result = attack(ctx, code)
    finally:
        peak = sampler.stop()
    assert not result.success and not result.timed_out
    assert re.search(r"MemoryError|OSError|Cannot allocate", result.stderr), result.stderr
    assert peak <= MEMORY_MB << 20


# -----------------------------------------------------------------------------
# correct programs still pass; the evaluator survives everything above

@needs_bwrap
def test_correct_programs_pass_and_wrong_ones_fail():
    result = run_sandboxed("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.success and not result.timed_out and result.stdout == "ok\n"
    result = run_sandboxed("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not result.success and not result.timed_out and "AssertionError" in result.stderr
    result = run_sandboxed("import os\nopen('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())\n")
    assert result.success and result.stdout == "hi\n"


@needs_bwrap
def test_humaneval_real_sample_passes_through_the_sandbox(shared_data):
    task = HumanEval(path=shared_data / "humaneval_sample.jsonl")
    assert len(task) >= 5
    for i in range(len(task)):
        item = task[i]
        assert task.evaluate(item, item["messages"][1]["content"]), item["task_id"]
        assert not task.evaluate(item, item["prompt"] + "    return None\n"), item["task_id"]


@needs_bwrap
def test_sandbox_from_a_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(run_sandboxed("print(6 * 7)")))
    thread.start()
    thread.join()
    assert results[0].success and results[0].stdout == "42\n"


# -----------------------------------------------------------------------------
# without the sandbox tool: one line naming the package, unless --unsafe-exec

@pytest.fixture
def no_bwrap(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sandbox.sandbox_problem.cache_clear()
    yield empty
    sandbox.sandbox_problem.cache_clear()


def test_missing_bubblewrap_is_refused_with_the_package_name(no_bwrap):
    with pytest.raises(UserError, match=r"'bubblewrap' package .*--unsafe-exec"):
        run_sandboxed("print(1)")
    with pytest.raises(UserError, match="bubblewrap"):
        HumanEval(path="unused.jsonl")


def test_broken_bubblewrap_is_refused(no_bwrap):
    fake = no_bwrap / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(UserError, match="cannot start a sandbox here .*No permissions to create new namespace"):
        run_sandboxed("print(1)")


def test_chat_eval_refuses_humaneval_without_the_sandbox(no_bwrap, tmp_path, capsys):
    env = subprocess_env(PATH=str(no_bwrap))
    argv = ["-a", "HumanEval", "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", *argv], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bubblewrap" in lines[0], result.stderr
    # --unsafe-exec gets past the sandbox check to the next thing missing here: the HumanEval data (in this
    # process: the real process's exit path is covered above, and a second torch import costs ~10-25 s)
    from scripts import chat_eval
    code, err = run_main(chat_eval.main, [*argv, "--unsafe-exec"], capsys)
    assert code == 2
    assert "bubblewrap" not in err and "humaneval" in err.lower(), err


# -----------------------------------------------------------------------------
# the inner layer alone (unsafe_exec): rlimits, Python-level guards, process-group kill

def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_inner_layer_guards(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in [f"open({str(target)!r}, 'w').write('x')\n", "import socket\nsocket.socket()\n",
                 "import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n", "import multiprocessing\n"]:
        result = run_sandboxed(code, unsafe_exec=True)
        assert not result.success and not result.timed_out and "Error" in result.stderr, code
    assert not target.exists()
    result = run_sandboxed("x = bytearray(1 << 30)\n", memory_mb=256, unsafe_exec=True)
    assert not result.success and "MemoryError" in result.stderr


def test_inner_layer_kills_the_process_group():
    code = ("import ctypes, time\nlibc = ctypes.CDLL(None)\n"
            "for _ in range(5):\n    pid = libc.fork()\n"
            "    if pid == 0:\n        time.sleep(60)\n        libc._exit(0)\n"
            "    print(pid, flush=True)\ntime.sleep(60)\n")
    # 5 s: on a busy machine the interpreter may need seconds to start and fork all five before the kill
    result = run_sandboxed(code, timeout_s=5.0, unsafe_exec=True)
    assert result.timed_out
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 5
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
