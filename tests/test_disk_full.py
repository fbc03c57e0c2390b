"""A full disk, for real: each stage runs with its output folder on a small tmpfs, mounted in a private mount
namespace (`unshare -m`, or `unshare -rm` for a non-root user) so nothing outside the test sees it. Every case
must end with exit 2 and one `error:` line naming the folder and the space the step needs, and leave the
previous artifact (checkpoint, dataset, tokenizer) usable."""

import random
import shutil
import subprocess
import sys

import pytest

from tests.conftest import TINY_RUN, subprocess_env


def _mount_prefix(probe_dir):
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe_dir}"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.fixture
def tmpfs(tmp_path):
    """run(mountpoint, script): a shell script run where `mountpoint` is a fresh 64 MB tmpfs; its files vanish
    with the namespace when the script ends, so it does its own checks. `limit` in the script (a shell
    function) then shrinks the tmpfs to what it holds plus N bytes: `limit 4096`."""
    prefix = _mount_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs unshare and root or user "
                    "namespaces)")

    def run(mountpoint, script):
        mountpoint.mkdir(parents=True, exist_ok=True)
        full = (f"set -e\nmount -t tmpfs -o size=64m tmpfs {mountpoint}\n"
                f"limit() {{ used=$(df -B1 --output=used {mountpoint} | tail -1); "
                f"mount -o remount,size=$(( (used + $1 + 4095) / 4096 * 4096 )) {mountpoint}; }}\n{script}")
        return subprocess.run([*prefix, "sh", "-c", full], env=subprocess_env(), capture_output=True, text=True,
                              timeout=600)
    return run


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


PY = sys.executable


def resume_from_step_1(trained, tmpfs, mnt, squeeze, check):
    """TINY_RUN resumed from step 1 of `trained`, copied to the tmpfs at `mnt` and squeezed by the shell lines
    `squeeze`, then the python `check` run: (its stdout, the one error line). The resume must be refused (exit 2)
    with one error line and no traceback."""
    result = tmpfs(mnt, f"""
cp -a {trained} {mnt}/base
rm -r {mnt}/base/checkpoints/base/d2/step_000002
{squeeze}
export NANOPIPE_BASE_DIR={mnt}/base NANOPIPE_REPORT_DIR={mnt}/report
{PY} -m scripts.base_train {' '.join(TINY_RUN)} --resume && exit 99 || echo "EXIT $?"
{PY} -c "{check}"
""")
    assert "EXIT 2" in result.stdout, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stdout, errors[0]


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(trained, tmp_path, tmpfs):
    """A run resumed from step 1 whose step-2 checkpoint does not fit: refused before writing, step 1 intact."""
    mnt = tmp_path / "mnt"
    check = ("from nanopipe.checkpoint import checkpoint_root, list_steps, load_checkpoint; import os; "
             "d = checkpoint_root('base') / 'd2'; c = load_checkpoint(d); "
             "print('STEPS', list_steps(d), c['step'], sorted(os.listdir(d)))")
    stdout, error = resume_from_step_1(trained, tmpfs, mnt, "limit 200000", check)
    assert f"no space left on the device of {mnt}/base/checkpoints/base/d2: the checkpoint of step 2 needs about" \
        in error, error
    assert "STEPS [1] 1 ['step_000001']" in stdout, stdout  # loadable, and no temp folder left


def test_checkpoint_write_running_out_of_inodes_midway_removes_the_partial_folder(trained, tmp_path, tmpfs):
    """The space check passes but the disk fills while writing (no inode left after rank0.pt): the partial
    step folder is removed and step 1 stays the last checkpoint."""
    mnt = tmp_path / "mnt"
    check = ("from nanopipe.checkpoint import checkpoint_root, list_steps; import os; "
             "d = checkpoint_root('base') / 'd2'; print('STEPS', list_steps(d), sorted(os.listdir(d)))")
    # the log rewrite's temp file, the step's temp folder and rank0.pt get inodes; model.safetensors does not
    squeeze = (f"inodes=$(( $(stat -f -c '%c - %d' {mnt}) ))\n"
               f"mount -o remount,nr_inodes=$(( inodes + 3 )) {mnt}")
    stdout, error = resume_from_step_1(trained, tmpfs, mnt, squeeze, check)
    assert "the checkpoint of step 2 needs about" in error and "no free inode" in error, error
    assert "STEPS [1] ['step_000001']" in stdout, stdout


def test_dataset_build_on_a_full_disk_leaves_the_previous_dataset(tmp_path, tmpfs):
    rng = random.Random(0)
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    for i in range(20):
        (small / f"{i}.txt").write_text(f"small document {i}")
    table = bytes(ord("a") + i % 26 for i in range(256))  # each byte value to a letter
    for i in range(400):  # ~4 MB of random letters: zstd keeps most of it
        (big / f"{i}.txt").write_bytes(rng.randbytes(10_000).translate(table))
    mnt = tmp_path / "mnt"
    check = ("from nanopipe import shards; import os; train, val = shards.list_shards('mine'); "
             "print('DOCS', sum(1 for _ in shards.iter_documents('mine', 'train')), "
             "sorted(os.listdir(val.parent.parent)))")
    result = tmpfs(mnt, f"""
export NANOPIPE_BASE_DIR={mnt}/base
{PY} -m scripts.dataset local --name mine {small} --val-every 10
limit 1500000
{PY} -m scripts.dataset local --name mine {big} && exit 99 || echo "EXIT $?"
{PY} -c "{check}"
""")
    assert "EXIT 2" in result.stdout, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no space left on the device of {mnt}/base/data: building dataset mine needs up to 4.0 MB" in errors[0], \
        errors[0]
    assert "DOCS 18 ['mine']" in result.stdout, result.stdout  # the old dataset, and no temp folder beside it


def test_tokenizer_and_report_on_a_full_disk(trained, tmp_path, tmpfs):
    mnt = tmp_path / "mnt"
    tok = f"{PY} -m scripts.tok_train --vocab-size 300 --data toy"
    result = tmpfs(mnt, f"""
cp -a {trained} {mnt}/base
export NANOPIPE_BASE_DIR={mnt}/base NANOPIPE_REPORT_DIR={tmp_path}/report
sha=$(sha256sum {mnt}/base/tokenizer/tokenizer.json)
limit 8192
{tok} && exit 99 || echo "EXIT $?"
echo "$sha" | sha256sum -c - && echo TOKENIZER KEPT
ls -a {mnt}/base
# the tokenizer fits, the report folder is full
export NANOPIPE_BASE_DIR={tmp_path}/base NANOPIPE_REPORT_DIR={mnt}/report
cp -a {trained} {tmp_path}/base
mkdir {mnt}/report
head -c 100000000 /dev/zero > {mnt}/filler 2>/dev/null || true
{tok} && exit 99 || echo "EXIT $?"
""")
    assert result.stdout.count("EXIT 2") == 2, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"no space left on the device of {mnt}/base: the tokenizer needs about" in errors[0], errors[0]
    assert "TOKENIZER KEPT" in result.stdout and ".tokenizer" not in result.stdout, result.stdout
    assert f"no space left on the device of {mnt}/report/sections: writing " in errors[1], errors[1]
