"""SIGKILL at random points: `dataset local`, `tok_train`, `base_train` and `chat_sft` are killed (the whole process
group, as a power cut would) at a random moment of an otherwise normal run, then the same command is run again.
Every rerun must resume to the result of an uninterrupted run (bitwise equal weights, the same tokenizer and
dataset bytes, a log with each step once) or refuse with one `error:` line, and no reader may ever see a partial
dataset or tokenizer. The default suite kills each stage once; `-m slow` kills each 10 times."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanopipe import shards
from nanopipe.checkpoint import list_steps, load_weights, step_dir
from nanopipe.common import UserError
from nanopipe.tokenizer import Tokenizer
from nanopipe.training import read_log
from scripts import base_train
from tests.conftest import subprocess_env, synthetic_world

BASE_FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
              "--device-batch-size", "4", "--total-batch-size", "256", "--core-metric-every", "-1",
              "--sample-every", "-1", "--device", "cpu", "--data", "synthetic"]
TRAIN_FLAGS = [*BASE_FLAGS, "--num-iterations", "12", "--save-every", "2", "--keep-last", "2", "--eval-every", "4",
               "--eval-tokens", "512", "--model-tag", "k", "--resume"]
SFT_FLAGS = ["--device-batch-size", "4", "--val-conversations", "24", "--eval-every", "3", "--device", "cpu",
             "--num-iterations", "9", "--save-every", "3", "--keep-last", "2", "--model-tag", "d2", "--resume"]
RNG = random.Random()  # unseeded: each run of the suite kills at other points
OUTCOMES = []  # one line per kill, printed by the tests (pytest -s shows them)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world (2 shards), a 512-token tokenizer and an 8-step d2 base model for chat_sft."""
    base = tmp_path_factory.mktemp("kill_world") / "base"
    with synthetic_world(base, base.parent / "report"):
        base_train.main([*BASE_FLAGS, "--num-iterations", "8", "--eval-every", "-1", "--model-tag", "d2"])
    return base


def env_for(base):
    return subprocess_env(NANOPIPE_BASE_DIR=base, NANOPIPE_REPORT_DIR=base.parent / "report")


def run(cmd, base):
    """Run a stage to the end: (seconds, CompletedProcess)."""
    t0 = time.monotonic()
    result = subprocess.run(cmd, env=env_for(base), capture_output=True, text=True, timeout=600)
    return time.monotonic() - t0, result


def kill_after(cmd, base, seconds):
    """Start the stage and SIGKILL its process group after `seconds`; False when it finished first."""
    proc = subprocess.Popen(cmd, env=env_for(base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def rerun_ok(cmd, base):
    """The rerun after a kill: it finishes (True), or refuses with one error line and no traceback (False)."""
    _, result = run(cmd, base)
    if result.returncode == 0:
        return True
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return False


def fresh_copy(world, tmp_path, name, drop=()):
    base = tmp_path / name / "base"
    shutil.copytree(world, base, ignore=shutil.ignore_patterns(*drop))
    return base


def kill_points(reference_seconds, kills):
    """Random moments across the whole run (start-up included) and a little past its usual end."""
    return [RNG.uniform(0.05, 1.1) * reference_seconds for _ in range(kills)]


# ---------------------------------------------------------------------------------------------
# dataset local

def _local_sources(root):
    rng = random.Random(0)
    words = "river stone cloud seven green quick brown fox jumps over lazy dog city paris".split()
    root.mkdir()
    with open(root / "web.jsonl", "w") as f:
        for i in range(40_000):
            text = f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    return root


def visible_dataset(base, name, monkeypatch):
    """What a stage would read now: None (refused: absent or incomplete) or the manifest it trusts."""
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(base))
    try:
        train, val = shards.list_shards(name)
    except UserError:
        return None
    return json.loads((val.parent / "manifest.json").read_text())


def check_dataset_local(tmp_path, kills, monkeypatch):
    sources = _local_sources(tmp_path / "src")
    cmd = [sys.executable, "-m", "scripts.dataset", "local", "--name", "mine", str(sources),
           "--docs-per-shard", "2000"]
    reference_base = tmp_path / "reference"
    seconds, result = run(cmd, reference_base)
    assert result.returncode == 0, result.stderr
    reference = visible_dataset(reference_base, "mine", monkeypatch)
    assert reference["num_shards"] == 21
    for i, at in enumerate(kill_points(seconds, kills)):
        base = tmp_path / f"kill{i}"
        killed = kill_after(cmd, base, at)
        seen = visible_dataset(base, "mine", monkeypatch)
        assert seen in (None, reference)  # absent or whole, never partial
        OUTCOMES.append(f"dataset local killed at {at:.1f}s of {seconds:.1f}s: {'killed' if killed else 'had finished'}"
                        f", dataset {'absent' if seen is None else 'complete'}")
        assert rerun_ok(cmd, base)
        assert visible_dataset(base, "mine", monkeypatch) == reference
        assert not list((base / "data").glob(".mine.*")), "the killed build's temp folder is still there"


# ---------------------------------------------------------------------------------------------
# tok_train

def check_tok_train(world, tmp_path, kills):
    cmd = [sys.executable, "-m", "scripts.tok_train", "--vocab-size", "1024", "--data", "synthetic"]
    reference_base = fresh_copy(world, tmp_path, "reference", drop=("tokenizer", "checkpoints"))
    seconds, result = run(cmd, reference_base)
    assert result.returncode == 0, result.stderr
    reference = (reference_base / "tokenizer" / "tokenizer.json").read_bytes()
    for i, at in enumerate(kill_points(seconds, kills)):
        base = fresh_copy(world, tmp_path, f"kill{i}", drop=("checkpoints",))  # the old 512-token tokenizer
        old = (base / "tokenizer" / "tokenizer.json").read_bytes()
        killed = kill_after(cmd, base, at)
        # a reader sees the old tokenizer or the complete new one
        seen = (base / "tokenizer" / "tokenizer.json").read_bytes()
        assert seen in (old, reference)
        assert Tokenizer.load(base / "tokenizer").vocab_size in (512, 1024)
        OUTCOMES.append(f"tok_train killed at {at:.1f}s of {seconds:.1f}s: {'killed' if killed else 'had finished'}"
                        f", tokenizer {'old' if seen == old else 'new'}")
        assert rerun_ok(cmd, base)
        assert (base / "tokenizer" / "tokenizer.json").read_bytes() == reference
        assert not [p.name for p in base.iterdir() if p.name.startswith(".tokenizer.")], "temp folders left"


# ---------------------------------------------------------------------------------------------
# base_train and chat_sft

def final_state(base, kind, tag):
    ckpt_dir = base / "checkpoints" / kind / tag
    step = list_steps(ckpt_dir)[-1]
    return step, load_weights(step_dir(ckpt_dir, step))


def check_log(records, reference, num_steps, final_line):
    """Each step once with the uninterrupted run's loss, and the final line (if the stage writes one) once."""
    losses = {r["step"]: r["loss"] for r in reference if "loss" in r}
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in train] == list(range(1, num_steps + 1))
    assert all(losses[s] == loss for s, loss in train)
    assert sum(1 for r in records if r.get("final")) == final_line


_REFERENCES = {}  # command -> its uninterrupted run, shared by the tests of this module


def reference_run(world, tmp_path, cmd, kind, tag, log_name, num_steps, final_line):
    """(seconds, final weights, log records) of the uninterrupted run of `cmd` on a copy of the world."""
    key = tuple(cmd)
    if key not in _REFERENCES:
        base = fresh_copy(world, tmp_path, "reference")
        seconds, result = run(cmd, base)
        assert result.returncode == 0, result.stderr
        step, weights = final_state(base, kind, tag)
        log = read_log(base / "logs" / log_name)
        assert step == num_steps
        check_log(log, log, num_steps, final_line)
        _REFERENCES[key] = seconds, weights, log
    return _REFERENCES[key]


def check_training(world, tmp_path, kills, cmd, kind, tag, log_name, num_steps, final_line):
    seconds, ref_weights, ref_log = reference_run(world, tmp_path, cmd, kind, tag, log_name, num_steps, final_line)
    for i, at in enumerate(kill_points(seconds, kills)):
        base = fresh_copy(world, tmp_path, f"kill{i}")
        killed = kill_after(cmd, base, at)
        resumed = rerun_ok(cmd, base)
        OUTCOMES.append(f"{kind} killed at {at:.1f}s of {seconds:.1f}s: "
                        f"{'killed' if killed else 'had finished'}, rerun {'resumed' if resumed else 'refused'}")
        if not resumed:
            continue  # refused with one line (none of these kills should need it, but it is allowed)
        step, weights = final_state(base, kind, tag)
        assert step == num_steps, (killed, at)
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), (killed, at)
        check_log(read_log(base / "logs" / log_name), ref_log, num_steps, final_line)
        leftovers = [p.name for p in (base / "checkpoints" / kind / tag).iterdir() if not p.name.startswith("step_")]
        assert not leftovers, leftovers


def check_base_train(world, tmp_path, kills):
    cmd = [sys.executable, "-m", "scripts.base_train", *TRAIN_FLAGS]
    check_training(world, tmp_path, kills, cmd, "base", "k", "k.jsonl", 12, 1)


def check_chat_sft(world, tmp_path, kills):
    cmd = [sys.executable, "-m", "scripts.chat_sft", *SFT_FLAGS]
    check_training(world, tmp_path, kills, cmd, "sft", "d2", "sft-d2.jsonl", 9, 0)


STAGES = ["dataset_local", "tok_train", "base_train", "chat_sft"]


def check_stage(stage, world, tmp_path, kills, monkeypatch):
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")  # the subprocesses' dataset (chat_sft has no --data)
    if stage == "dataset_local":
        check_dataset_local(tmp_path, kills, monkeypatch)
    elif stage == "tok_train":
        check_tok_train(world, tmp_path, kills)
    elif stage == "base_train":
        check_base_train(world, tmp_path, kills)
    else:
        check_chat_sft(world, tmp_path, kills)


@pytest.mark.parametrize("stage", STAGES)
def test_one_random_kill_then_rerun(stage, world, tmp_path, monkeypatch):
    check_stage(stage, world, tmp_path, 1, monkeypatch)
    print("\n".join(OUTCOMES))
    OUTCOMES.clear()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_ten_random_kills_then_rerun(stage, world, tmp_path, monkeypatch):
    check_stage(stage, world, tmp_path, 10, monkeypatch)
    print("\n".join(OUTCOMES))
    OUTCOMES.clear()


def test_a_kill_between_the_checkpoint_and_its_log_line_keeps_the_log_whole(world, tmp_path, monkeypatch):
    """Kill the moment a step folder appears: its val eval runs before the log line, so the line is not written
    yet; the rerun takes it from the checkpoint. A rerun of the finished run adds no second final line."""
    cmd = [sys.executable, "-m", "scripts.base_train", *TRAIN_FLAGS]
    _, _, ref_log = reference_run(world, tmp_path, cmd, "base", "k", "k.jsonl", 12, 1)
    for attempt in range(3):
        base = fresh_copy(world, tmp_path, f"kill{attempt}")
        proc = subprocess.Popen(cmd, env=env_for(base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        target = step_dir(base / "checkpoints" / "base" / "k", 4)  # step 4 is saved, then evaluated, then logged
        deadline = time.monotonic() + 300
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lost = [r["step"] for r in read_log(base / "logs" / "k.jsonl") if "loss" in r]
        if target.exists() and lost == [1, 2, 3]:
            break
    else:
        pytest.fail("could not kill between a checkpoint and its log line in 3 attempts")
    assert rerun_ok(cmd, base)
    check_log(read_log(base / "logs" / "k.jsonl"), ref_log, 12, 1)
    assert rerun_ok(cmd, base)  # the finished run again: final evals redone, the final line replaced
    log = read_log(base / "logs" / "k.jsonl")
    check_log(log, ref_log, 12, 1)
    assert [r["step"] for r in log if "val_bpb" in r] == [0, 8, 12]  # step 4's eval died with the kill


def test_leftovers_of_killed_saves_and_prunes_are_removed_by_the_next_save(world, tmp_path):
    """What kills leave (a half-written step, a half-pruned one, an older version's prune that left only
    rank0.pt, a tokenizer temp folder of a dead process) is never read and is removed by the next run."""
    base = fresh_copy(world, tmp_path, "left")
    cmd = [sys.executable, "-m", "scripts.base_train", *BASE_FLAGS, "--num-iterations", "4", "--save-every", "1",
           "--keep-last", "10", "--eval-every", "-1", "--model-tag", "x", "--resume"]
    assert run(cmd, base)[1].returncode == 0
    ckpt = base / "checkpoints" / "base" / "x"
    for step in (3, 4):  # as if killed right after the step-2 checkpoint...
        shutil.rmtree(step_dir(ckpt, step))
    for name in os.listdir(step_dir(ckpt, 1)):  # ...with an older version's prune of step 1 cut short
        if name != "rank0.pt":
            os.unlink(step_dir(ckpt, 1) / name)
    (ckpt / ".step_000003.tmp").mkdir()
    (ckpt / ".step_000000.pruned").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (base / f".tokenizer.tmp-{dead.pid}").mkdir()
    (base / f".tokenizer.tmp-{dead.pid}" / "tokenizer.json").write_text("{")
    assert run(cmd, base)[1].returncode == 0
    assert sorted(os.listdir(ckpt)) == ["step_000002", "step_000003", "step_000004"]
    tok = [sys.executable, "-m", "scripts.tok_train", "--vocab-size", "512", "--data", "synthetic"]
    assert run(tok, base)[1].returncode == 0
    assert not [p.name for p in base.iterdir() if p.name.startswith(".tokenizer.")]
