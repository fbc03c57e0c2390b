"""Hostile inputs at the door. Each must end with exit code 2 and exactly one `error:` line naming the culprit,
with no traceback and nothing on disk changed (the base dir and the report dir are compared before and after).

Stages run in-process through their main(argv) on one tiny real world built for the module (synthetic data,
a 512-token tokenizer, a 2-step base model and a 2-step SFT model); a few run as real subprocesses.
"""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanopipe import dataset, report
from nanopipe.common import get_base_dir
from nanopipe.tokenizer import Tokenizer
from scripts import base_eval, base_train, chat_cli, chat_eval, chat_sft, export, tok_eval, tok_train
from tests.conftest import subprocess_env

TINY_BASE = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
             "--device-batch-size", "2", "--total-batch-size", "128", "--num-iterations", "2", "--eval-every", "-1",
             "--core-metric-every", "-1", "--sample-every", "-1", "--device", "cpu"]
TINY_SFT = ["--device-batch-size", "2", "--val-conversations", "4", "--eval-every", "-1", "--device", "cpu",
            "--num-iterations", "2"]
BAD_UTF8 = b"caf\xe9 \xff\xfe\n"  # latin-1, not UTF-8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile_world")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOPIPE_BASE_DIR", str(base))
        mp.setenv("NANOPIPE_REPORT_DIR", str(base / "report"))
        mp.setenv("NANOPIPE_DATA", "synthetic")
        dataset.build_synthetic(num_shards=2)
        docs = (text for text, _ in dataset.iter_documents("synthetic", "train"))
        Tokenizer.train(docs, vocab_size=512).save(get_base_dir() / "tokenizer")
        base_train.main([*TINY_BASE, "--model-tag", "d2"])
        chat_sft.main(TINY_SFT)
    return base


@pytest.fixture
def base(world, tmp_path, monkeypatch):
    """A private copy of the world (tests may break its files), as the base dir, with the report dir inside."""
    copy = tmp_path / "base"
    shutil.copytree(world, copy)
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(copy))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(copy / "report"))
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    monkeypatch.chdir(tmp_path)
    return copy


def snapshot(root):
    """Every file and folder under root with its size and mtime."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def refuse(main, argv, culprit, root, capsys):
    """Run main(argv) in-process; assert exit 2, one `error:` line containing `culprit`, nothing changed."""
    before = snapshot(root)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            if main(argv) == 2:  # nanopipe.dataset returns its exit code
                sys.exit(2)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in (out + err).splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert culprit in errors[0], errors[0]
    assert snapshot(root) == before, "the failed attempt changed files"
    return errors[0]


MAINS = {"base_train": base_train.main, "chat_sft": chat_sft.main, "chat_eval": chat_eval.main,
         "chat_cli": chat_cli.main, "base_eval": base_eval.main, "tok_train": tok_train.main,
         "tok_eval": tok_eval.main, "dataset": dataset.main, "report": report.main, "export": export.main}

# (stage, argv, the text the error line must contain)
FLAGS = [
    ("base_train", ["--depth", "0"], "--depth"),
    ("base_train", ["--depth", "99999999999999999999"], "--depth"),
    ("base_train", ["--aspect-ratio", "-64"], "--aspect-ratio"),
    ("base_train", ["--head-dim", "33"], "--head-dim 33"),
    ("base_train", ["--head-dim", "0"], "--head-dim"),
    ("base_train", ["--max-seq-len", "0"], "--max-seq-len"),
    ("base_train", ["--num-iterations", "0"], "--num-iterations"),
    ("base_train", ["--target-param-data-ratio", "nan"], "--target-param-data-ratio"),
    ("base_train", ["--target-param-data-ratio", "0"], "--target-param-data-ratio"),
    ("base_train", ["--target-flops", "nan"], "--target-flops"),
    ("base_train", ["--target-flops", "inf"], "--target-flops"),
    ("base_train", ["--seed", "99999999999999999999999"], "--seed"),
    ("base_train", ["--seed", "-1"], "--seed"),
    ("base_train", ["--device-batch-size", "0"], "--device-batch-size"),
    ("base_train", ["--total-batch-size", "0"], "--total-batch-size"),
    ("base_train", ["--embedding-lr", "nan"], "--embedding-lr"),
    ("base_train", ["--matrix-lr", "-1"], "--matrix-lr"),
    ("base_train", ["--weight-decay", "inf"], "--weight-decay"),
    ("base_train", ["--warmup-ratio", "2"], "--warmup-ratio"),
    ("base_train", ["--warmup-ratio", "0.6", "--warmdown-ratio", "0.6"], "--warmup-ratio 0.6 + --warmdown-ratio"),
    ("base_train", ["--final-lr-frac", "nan"], "--final-lr-frac"),
    ("base_train", ["--grad-clip", "nan"], "--grad-clip"),
    ("base_train", ["--eval-every", "0"], "--eval-every"),
    ("base_train", ["--eval-tokens", "-1"], "--eval-tokens"),
    ("base_train", ["--core-metric-every", "0"], "--core-metric-every"),
    ("base_train", ["--core-metric-max-per-task", "0"], "--core-metric-max-per-task"),
    ("base_train", ["--save-every", "0"], "--save-every"),
    ("base_train", ["--keep-last", "0"], "--keep-last"),
    ("chat_sft", ["--num-epochs", "0"], "--num-epochs"),
    ("chat_sft", ["--num-epochs", "-1"], "--num-epochs"),
    ("chat_sft", ["--num-epochs", "nan"], "--num-epochs"),
    ("chat_sft", ["--num-iterations", "0"], "--num-iterations"),
    ("chat_sft", ["--init-lr-frac", "nan"], "--init-lr-frac"),
    ("chat_sft", ["--warmdown-ratio", "1.5"], "--warmdown-ratio"),
    ("chat_sft", ["--grad-clip", "nan"], "--grad-clip"),
    ("chat_sft", ["--val-conversations", "0"], "--val-conversations"),
    ("chat_sft", ["--max-seq-len", "-1"], "--max-seq-len"),
    ("chat_sft", ["--mixture", "synthetic:inf"], "--mixture"),
    ("chat_sft", ["--mixture", "synthetic:-1"], "--mixture"),
    ("chat_sft", ["--mixture", "nope"], "--mixture"),
    ("chat_eval", ["--max-problems", "0"], "--max-problems"),
    ("chat_eval", ["--temperature", "nan"], "--temperature"),
    ("chat_eval", ["--top-k", "0"], "--top-k"),
    ("chat_eval", ["--num-samples", "0"], "--num-samples"),
    ("chat_eval", ["--max-new-tokens", "-1"], "--max-new-tokens"),
    ("chat_eval", ["--batch-size", "0"], "--batch-size"),
    ("chat_cli", ["-t", "nan"], "--temperature"),
    ("chat_cli", ["-t", "-1"], "--temperature"),
    ("chat_cli", ["-k", "0"], "--top-k"),
    ("chat_cli", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("base_eval", ["--max-per-task", "0"], "--max-per-task"),
    ("base_eval", ["--split-tokens", "0"], "--split-tokens"),
    ("base_eval", ["--step", "-1"], "--step"),
    ("tok_train", ["--vocab-size", "99999999999"], "--vocab-size"),
    ("tok_train", ["--max-chars", "0"], "--max-chars"),
    ("tok_eval", ["--max-chars", "-1"], "--max-chars"),
    ("dataset", ["local", "--name", "mine", "a", "b", "--weights", "inf,1"], "--weights"),
    ("dataset", ["local", "--name", "mine", "a", "b", "--weights", "nan,1"], "--weights"),
    ("dataset", ["local", "--name", "mine", "a", "b", "--weights", "0,0"], "--weights"),
    ("dataset", ["local", "--name", "mine", "a", "--val-every", "0"], "--val-every"),
    ("dataset", ["local", "--name", "mine", "a", "--docs-per-shard", "0"], "--docs-per-shard"),
    ("dataset", ["download", "fineweb-edu", "-n", "0"], "--num-shards"),
    ("dataset", ["download", "fineweb-edu", "--workers", "0"], "--workers"),
    ("dataset", ["synthetic", "-n", "-1"], "--num-shards"),
    ("dataset", ["chat-data", "--only", "nope"], "--only"),
    ("report", ["generate", "--dollars-per-hour", "-5"], "--dollars-per-hour"),
    ("report", ["generate", "--dollars-per-hour", "nan"], "--dollars-per-hour"),
    ("export", ["--out", "exported", "--step", "-1"], "--step"),
]


@pytest.mark.parametrize("stage,argv,culprit", FLAGS, ids=[f"{s} {' '.join(a)}" for s, a, _ in FLAGS])
def test_bad_flag_is_refused_before_anything_runs(world, tmp_path, monkeypatch, capsys, stage, argv, culprit):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(world))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(world / "report"))
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    extra = TINY_BASE if stage == "base_train" else TINY_SFT if stage == "chat_sft" else []
    refuse(MAINS[stage], [*extra, *argv], culprit, world, capsys)


TAGS = ["../../x", "../x", "/tmp/x", "", "a/b", ".."]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("stage", ["base_train", "chat_sft", "base_eval", "chat_eval", "chat_cli", "export"])
def test_tags_never_leave_the_base_dir(base, capsys, stage, tag):
    extra = {"base_train": TINY_BASE, "chat_sft": TINY_SFT, "export": ["--out", "exported"]}.get(stage, [])
    refuse(MAINS[stage], [*extra, "--model-tag", tag], "--model-tag", base.parent, capsys)


@pytest.mark.parametrize("name", ["../../x", "", "a/b", ".."])
def test_dataset_names_never_leave_the_base_dir(base, capsys, name):
    (base.parent / "a.txt").write_text("some text " * 20)
    refuse(tok_train.main, ["--data", name], "--data", base.parent, capsys)
    refuse(dataset.main, ["local", "--name", name, "a.txt"], "--name", base.parent, capsys)


def test_dataset_name_from_the_environment_is_checked(base, capsys, monkeypatch):
    monkeypatch.setenv("NANOPIPE_DATA", "../../x")
    refuse(tok_eval.main, [], "NANOPIPE_DATA", base.parent, capsys)


@pytest.mark.parametrize("argv,culprit", [
    (["scripts.base_train", "--depth", "0"], "--depth"),
    (["scripts.chat_sft", "--num-epochs", "-1"], "--num-epochs"),
    (["nanopipe.dataset", "local", "--name", "x", "a", "b", "--weights", "inf,1"], "--weights"),
    (["scripts.base_train", *TINY_BASE, "--model-tag", "../../x"], "--model-tag"),
])
def test_bad_flags_in_a_real_process(base, argv, culprit):
    before = snapshot(base.parent)
    r = subprocess.run([sys.executable, "-m", *argv], env=subprocess_env(), capture_output=True, text=True,
                       timeout=300, cwd=base.parent)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and culprit in errors[0], errors
    assert snapshot(base.parent) == before
