"""Progress in a log file: what `> log 2>&1` captures holds plain lines, never a bar's carriage-return redraws."""

import re
import shutil
import subprocess
import sys
import textwrap

from tests.conftest import subprocess_env

LOOP = textwrap.dedent("""
    import sys
    from nanopipe.progress import Progress, track
    with Progress(50, "scoring", unit="prompts", every_seconds=0) as progress:
        for _ in range(50):
            progress.update()
    for _ in track(range(5), "short", leave=False):  # a quick transient loop: its caller reports the result
        pass
    with Progress(None, "0/3 files", nbytes=True, every_seconds=0) as progress:
        progress.update(1500)
        progress.set_description("3/3 files")
        progress.update(2_000_000)
    try:
        with Progress(10, "interrupted", every_seconds=0) as progress:
            progress.update(4)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
""")


def run_to_file(argv, path, env):
    with open(path, "w") as f:  # as `> log 2>&1` does: neither stream is a terminal
        result = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = path.read_bytes().decode("utf-8")  # read_text() would turn a lone \r into \n
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text, repr(text[-2000:])
    return text


def test_progress_writes_a_line_every_tenth_and_a_final_line_to_a_file(tmp_path):
    text = run_to_file([sys.executable, "-c", LOOP], tmp_path / "log", subprocess_env())
    lines = text.splitlines()
    scoring = [line for line in lines if line.startswith("scoring: ")]
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in scoring] == [str(p) for p in range(10, 101, 10)] \
        + ["100"], text
    assert scoring[0].startswith("scoring: 5 prompts of 50 prompts (10%), ") and ", eta " in scoring[0], scoring[0]
    assert re.fullmatch(r"scoring: 50 prompts of 50 prompts \(100%\), done in \d+s", scoring[-1]), scoring[-1]
    assert not any(line.startswith("short") for line in lines), text
    assert lines.count("0/3 files: 1.5 KB, 0s") == 1 and re.search(r"^3/3 files: 2.0 MB, done in \d+s$", text, re.M)
    interrupted = [line for line in lines if line.startswith("interrupted")]
    assert interrupted == ["interrupted: 4 items of 10 items (40%), 0s, eta 0s"], text  # no "done" line


def test_the_stages_write_no_bar_into_a_log_file(chat_world, tmp_path):
    """tok_train, CORE (base_eval) and chat_eval on the tiny trained world, their output redirected to a file."""
    base = tmp_path / "base"
    shutil.copytree(chat_world, base)
    env = subprocess_env(NANOPIPE_BASE_DIR=base, NANOPIPE_REPORT_DIR=tmp_path / "report", NANOPIPE_DATA="synthetic")
    text = run_to_file([sys.executable, "-m", "scripts.tok_train", "--vocab-size", "300", "--max-chars", "200000"],
                       tmp_path / "tok_train.log", env)
    assert re.search(r"^reading synthetic: [\d,]+ chars of 200,000 chars \(\d+%\), done in \d+s$", text, re.M), text
    shutil.rmtree(base / "tokenizer")
    shutil.copytree(chat_world / "tokenizer", base / "tokenizer")  # the models' own tokenizer back
    text = run_to_file([sys.executable, "-m", "scripts.base_eval", "--eval", "core", "--max-per-task", "4",
                        "--device", "cpu"], tmp_path / "base_eval.log", env)
    assert "CORE" in text, text
    text = run_to_file([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "--max-per-task", "4",
                        "--max-new-tokens", "8", "--device", "cpu"], tmp_path / "chat_eval.log", env)
    assert re.search(r"^world_mc: accuracy [\d.]+ \(\d+/\d+\)$", text, re.M), text
