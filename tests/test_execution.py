import os
import threading
import time

import pytest

from nanopipe.execution import calculate, run_sandboxed


# -----------------------------------------------------------------------------
# calculator

@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"),
    ("2 * (3 + 4) - 5", "9"),
    ("10/4", "2.5"),
    ("1/3", "0.3333333333"),
    ("48/2", "24"),              # an integral float prints as an integer
    ("7 // 2", "3"),
    ("-5 // 2", "-3"),
    ("17 % 5", "2"),
    ("-(3 - 10)", "7"),
    ("1,234 + 1", "1235"),       # thousands separators are stripped
    ("0.1 + 0.2", "0.3"),
    ("2**10", "1024"),
    ("2.5 * 4", "10"),
    ("'strawberry'.count('r')", "3"),
    ('"banana".count("an")', "2"),
    ("(" * 100 + "1" + ")" * 100, "1"),
    ("'strawberry'.count('r') + 1", "4"),
])
def test_calculator_computes(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo hi')",
    "open('/etc/passwd').read()",
    "x",
    "x + 1",
    "(1).real",
    "'abc'.upper()",
    "'abc'.count",
    "'abc'.count(x)",
    "'abc'.count('a', 1)",
    "().__class__",
    "[1, 2]",
    "lambda: 1",
    "1 if 1 else 2",
    "1 < 2",
    "9**9**9",
    "10**1000",
    "2**100000",
    "(10**50) * (10**60)",
    "1e308 * 10",
    "(-8) ** 0.5",
    "1/0",
    "5 % 0",
    "",
    "1 +",
    "1" * 300,                 # too long
    "+".join(["1"] * 200),     # too long
    None,
])
def test_calculator_refuses(expr):
    assert calculate(expr) is None


def test_calculator_from_threads():
    # no SIGALRM: works off the main thread, concurrently
    results = {}

    def work(i):
        results[i] = (calculate(f"{i} * 3 + 1"), calculate("9**9**9"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: (str(i * 3 + 1), None) for i in range(8)}


def test_calculator_is_fast_on_worst_cases():
    t0 = time.perf_counter()
    for expr in ["9**9**9", "2**1024 * 2**1024", "'a' * 10**9", "99**99**99", "(2**300)**3"]:
        assert calculate(expr) is None
    assert calculate("-" * 250 + "1") == "1"
    assert time.perf_counter() - t0 < 0.5


# -----------------------------------------------------------------------------
# program sandbox

def _alive(pid):
    # a zombie (exited, not yet reaped by init) counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sandbox_runs_correct_program():
    result = run_sandboxed("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.success and not result.timed_out
    assert result.stdout == "ok\n"


def test_sandbox_fails_wrong_program():
    result = run_sandboxed("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert not result.success and not result.timed_out
    assert "AssertionError" in result.stderr


def test_sandbox_kills_infinite_loop():
    t0 = time.perf_counter()
    result = run_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.success
    assert time.perf_counter() - t0 < 5


def test_sandbox_refuses_process_creation():
    for code in ["import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                 "import os\nos.system('true')\n", "import multiprocessing\n"]:
        result = run_sandboxed(code, timeout_s=5.0)
        assert not result.success and not result.timed_out, code


def test_sandbox_kills_the_whole_process_group():
    # the Python-level guard can be bypassed through libc; the process-group kill is the backstop.
    # Bounded "fork bomb": 10 children that would sleep for a minute, parent busy forever.
    code = (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        "for _ in range(10):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        libc._exit(0)\n"
        "    print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.perf_counter()
    result = run_sandboxed(code, timeout_s=2.0)
    assert result.timed_out and time.perf_counter() - t0 < 10
    pids = [int(line) for line in result.stdout.split()]
    assert len(pids) == 10
    deadline = time.time() + 5
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_sandbox_kills_children_left_behind():
    # a program that exits at once, leaving a child running: the child dies with the group
    code = (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        "pid = libc.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    libc._exit(0)\n"
        "print(pid, flush=True)\n"
    )
    result = run_sandboxed(code, timeout_s=5.0)
    assert result.success
    pid = int(result.stdout)
    deadline = time.time() + 5
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_sandbox_cannot_write_outside_its_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
        f"open('../../' + {str(target)!r}.lstrip('/'), 'a').write('x')\n",
    ]
    for code in attempts:
        result = run_sandboxed(code)
        assert not result.success, code
        assert "PermissionError" in result.stderr
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_sandbox_can_write_in_its_dir_which_is_removed():
    code = "import os\nopen('scratch.txt', 'w').write('hello')\nprint(open('scratch.txt').read(), os.getcwd())\n"
    result = run_sandboxed(code)
    assert result.success
    text, cwd = result.stdout.split()
    assert text == "hello"
    assert not os.path.exists(cwd)


def test_sandbox_stops_memory_hog():
    result = run_sandboxed("x = bytearray(1 << 30)\nprint('allocated')\n", memory_mb=256)
    assert not result.success
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_sandbox_has_no_network():
    result = run_sandboxed("import socket\ns = socket.socket()\n")
    assert not result.success
    assert "PermissionError" in result.stderr


def test_sandbox_from_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(run_sandboxed("print(6 * 7)")))
    thread.start()
    thread.join()
    assert results[0].success and results[0].stdout == "42\n"
