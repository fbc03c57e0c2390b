"""Hostile checkpoint and dataset files: every damaged part a stage opens gives exit 2, one `error:` line naming the
file (and what to do), no traceback, and leaves every file on disk as it was.

The checkpoints are real: a tiny base model trained for 2 steps (a checkpoint after each) by base_train itself.
"""

import os
import random
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from nanopipe import shards
from nanopipe.checkpoint import LEGACY_WEIGHTS, WEIGHTS, checkpoint_root, load_model, load_weights, step_dir
from nanopipe.gpt import build_model, config_from_depth
from scripts import base_train, chat_cli, tok_train
from tests.conftest import TINY_RUN, run_main, snapshot, subprocess_env


@pytest.fixture
def base(trained, isolated_dirs):
    """A private copy of the trained base dir (the test's NANOPIPE_BASE_DIR), to damage at will."""
    shutil.copytree(trained, isolated_dirs)
    return isolated_dirs


class Evil:
    """Unpickling this runs a shell command: a checkpoint must never be loaded with pickle's full power."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def damage(path, how, base):
    data = path.read_bytes() if path.exists() else b""
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(max(len(data), 64)))
    elif how == "missing":
        path.unlink()
    elif how == "pickle":  # a torch-style file whose unpickling would run code
        torch.save({"x": Evil(base / "pwned")}, path)
    elif how == "other_shape":  # the weights of a depth-3 model
        other = build_model(config_from_depth(3, 300, max_seq_len=32, aspect_ratio=32, head_dim=32), "cpu")
        safetensors.torch.save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    elif how == "json_list":
        path.write_text("[1, 2, 3]\n")
    elif how == "other_depth":
        path.write_text(data.decode().replace('"n_layer": 2', '"n_layer": 3'))
    else:
        raise ValueError(how)


def assert_refused(code, err, culprit, before, after):
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert str(culprit) in errors[0], errors[0]
    assert "Traceback" not in err, err
    assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return errors[0]


RESUME_CASES = [(f, how) for f in (WEIGHTS, "optim.pt", "rank0.pt", "meta.json")
                for how in ("truncated", "empty", "garbage", "missing")]
RESUME_CASES += [(WEIGHTS, "other_shape"), ("optim.pt", "pickle"), ("rank0.pt", "pickle"), ("meta.json", "json_list"),
                 ("meta.json", "other_depth")]


@pytest.mark.parametrize("name,how", RESUME_CASES, ids=[f"{f}-{h}" for f, h in RESUME_CASES])
def test_resume_refuses_a_damaged_checkpoint_part(base, capsys, name, how):
    step = step_dir(checkpoint_root("base") / "d2", 2)
    damage(step / name, how, base)
    before = snapshot(base, base.parent / "report")
    code, err = run_main(base_train.main, [*TINY_RUN, "--resume"], capsys)
    line = assert_refused(code, err, step / name, before, snapshot(base, base.parent / "report"))
    if how == "other_depth":
        assert "--depth" in line  # the configuration differs: resume with the same flags
    else:
        assert f"delete {step} to fall back to step 1" in line
    assert not (base / "pwned").exists()


LOAD_CASES = [(WEIGHTS, "truncated"), (WEIGHTS, "garbage"), (WEIGHTS, "missing"), (WEIGHTS, "other_shape"),
              ("meta.json", "garbage"), ("meta.json", "missing")]


@pytest.mark.parametrize("name,how", LOAD_CASES, ids=[f"{f}-{h}" for f, h in LOAD_CASES])
def test_loading_a_damaged_model_for_inference_is_refused(base, capsys, name, how):
    step = step_dir(checkpoint_root("base") / "d2", 2)
    damage(step / name, how, base)
    before = snapshot(base, base.parent / "report")
    code, err = run_main(chat_cli.main, ["-i", "base", "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"], capsys)
    assert_refused(code, err, step / name, before, snapshot(base, base.parent / "report"))


def test_a_damaged_checkpoint_is_refused_by_the_real_command_line(base):
    step = step_dir(checkpoint_root("base") / "d2", 2)
    damage(step / WEIGHTS, "truncated", base)
    before = snapshot(base, base.parent / "report")
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY_RUN, "--resume"], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert_refused(result.returncode, result.stderr, step / WEIGHTS, before, snapshot(base, base.parent / "report"))


def test_a_checkpoint_of_an_older_version_with_model_pt_still_loads_and_resumes(base, capsys):
    step = step_dir(checkpoint_root("base") / "d2", 2)
    weights = load_weights(step)
    torch.save(weights, step / LEGACY_WEIGHTS)
    (step / WEIGHTS).unlink()
    model, _, meta = load_model("base", device="cpu")
    assert meta["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    code, err = run_main(base_train.main, [*TINY_RUN, "--resume"], capsys)  # a finished run: resumes, trains nothing
    assert code == 0, err


DATA_CASES = ["no_manifest", "garbage_manifest", "val_missing", "train_truncated"]


@pytest.mark.parametrize("how", DATA_CASES)
def test_a_damaged_dataset_is_refused_before_anything_reads_it(base, capsys, how):
    folder = shards.dataset_dir("toy")
    culprit = {"no_manifest": folder, "garbage_manifest": folder / "manifest.json",
               "val_missing": folder / "shard_00002.parquet", "train_truncated": folder / "shard_00001.parquet"}[how]
    if how == "no_manifest":
        (folder / "manifest.json").unlink()
    elif how == "garbage_manifest":
        (folder / "manifest.json").write_bytes(b"\xff\xfe garbage")
    elif how == "val_missing":
        culprit.unlink()
    else:
        culprit.write_bytes(culprit.read_bytes()[:-200])
    before = snapshot(base, base.parent / "report")
    code, err = run_main(tok_train.main, ["--vocab-size", "300", "--data", "toy"], capsys)
    line = assert_refused(code, err, culprit, before, snapshot(base, base.parent / "report"))
    assert "python -m scripts.dataset local --name toy" in line
