"""The offline CPU speedrun end to end (slow): every report section with sane numbers, a rerun that does
nothing, and a run killed mid-pretraining that, rerun, ends with the same metrics as an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanopipe.training import read_log
from tasks.world.chat import DEMO_PROMPTS
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
# a shorter run than the default, same stages and code paths
SMALL = dict(SKIP_SETUP=1, DEPTH=2, BASE_STEPS=24, SFT_STEPS=12, SAVE_EVERY=5, CORE_MAX_PER_TASK=40,
             CHAT_EVAL_PROBLEMS=12)


def speedrun_env(root: Path) -> dict:
    return subprocess_env(NANOPIPE_BASE_DIR=root / "base", NANOPIPE_REPORT_DIR=root / "report", **SMALL)


def run_speedrun(root: Path, timeout=1500) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "runs/speedrun_cpu.sh"], cwd=REPO, env=speedrun_env(root),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(root: Path) -> dict:
    sections = {p.stem.split("-", 1)[1]: json.loads(p.read_text())["data"]
                for p in (root / "report" / "sections").glob("*.json")}
    return {"val_bpb": sections["base_train"]["val_bpb"], "core": sections["base_eval"]["core"],
            "sft_val_loss": sections["chat_sft"]["val_loss"], "chatcore": sections["chat_eval_sft"]["chatcore"],
            "chat_tasks": {k: v["accuracy"] for k, v in sections["chat_eval_sft"]["tasks"].items()}}


@pytest.mark.slow
def test_cpu_speedrun_report_rerun_and_kill_resume(tmp_path):
    straight = tmp_path / "straight"
    out = run_speedrun(straight).stdout
    assert "report: " in out and "chat:" in out
    assert "Stages not run" not in (straight / "report" / "report.md").read_text()
    report_md = (straight / "report" / "report.md").read_text()
    for title in ("Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
                  "Chat SFT", "Chat evaluation (base model)", "Chat evaluation (SFT model)", "## Summary",
                  "## Plots"):
        assert title in report_md, title
    assert list((straight / "report" / "plots").glob("*.svg"))
    m = metrics(straight)
    assert 0 < m["val_bpb"] < 3
    assert -1 <= m["core"] <= 1 and -1 <= m["chatcore"] <= 1
    assert set(m["chat_tasks"]) == {"world_mc", "world_facts", "world_arith", "world_spell"}

    # a rerun of a finished run skips every stage
    t0 = time.monotonic()
    rerun = run_speedrun(straight).stdout
    assert time.monotonic() - t0 < 60
    assert rerun.count("done already") == 8
    assert metrics(straight) == m

    # kill hard in the middle of pretraining, then run the same command again
    killed = tmp_path / "killed"
    proc = subprocess.Popen(["bash", "runs/speedrun_cpu.sh"], cwd=REPO, env=speedrun_env(killed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = killed / "base" / "logs" / "d2.jsonl"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= SMALL["BASE_STEPS"] // 2 for r in read_log(log)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_speedrun(killed)
    assert metrics(killed) == m


@pytest.mark.slow
def test_the_demo_model_answers_the_readme_prompts(tmp_path):
    """The README's example prompts, asked greedily, get the right answers from the demo's SFT model: the one
    of the run in $NANOPIPE_DEMO_BASE_DIR if set (e.g. the base dir of a finished `bash runs/speedrun_cpu.sh`),
    else of a default-size CPU speedrun run here (about 20 minutes on 2 cores)."""
    base = os.environ.get("NANOPIPE_DEMO_BASE_DIR")
    if base is None:
        base = tmp_path / "base"
        env = subprocess_env(NANOPIPE_BASE_DIR=base, NANOPIPE_REPORT_DIR=tmp_path / "report", SKIP_SETUP=1)
        result = subprocess.run(["bash", "runs/speedrun_cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=3600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--demo", "-t", "0"], cwd=REPO,
                            env=subprocess_env(NANOPIPE_BASE_DIR=base), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = dict(re.findall(r"^you> (.*)\nbot> (.*)$", result.stdout, re.MULTILINE))
    readme = (REPO / "README.md").read_text()
    for prompt, expected in DEMO_PROMPTS:
        assert prompt in readme
        assert re.search(rf"(?<!\w){re.escape(expected)}(?!\w)", answers[prompt]), (prompt, answers[prompt])
