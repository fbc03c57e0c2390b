"""Hostile inputs at the door. Each must end with exit code 2 and exactly one `error:` line naming the culprit,
with no traceback and nothing on disk changed (the base dir and the report dir are compared before and after).

Stages run in-process through their main(argv) on one tiny real world built for the module (synthetic data,
a 512-token tokenizer, a 2-step base model and a 2-step SFT model); a few run as real subprocesses.
"""

import io
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanopipe import report, shards
from nanopipe.common import file_sha256
from scripts import base_eval, base_train, chat_cli, chat_eval, chat_serve, chat_sft, export, tok_eval, tok_train
from scripts import dataset
from tests.conftest import subprocess_env, synthetic_world

TINY_BASE = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
             "--device-batch-size", "2", "--total-batch-size", "128", "--num-iterations", "2", "--eval-every", "-1",
             "--core-metric-every", "-1", "--sample-every", "-1", "--device", "cpu"]
TINY_SFT = ["--device-batch-size", "2", "--val-conversations", "4", "--eval-every", "-1", "--device", "cpu",
            "--num-iterations", "2"]
BAD_UTF8 = b"caf\xe9 \xff\xfe\n"  # latin-1, not UTF-8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile_world")
    with synthetic_world(base):
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
    """Every folder under root, and every file with its size and mtime (a folder's own mtime changes when a
    temp file inside it comes and goes, which leaves nothing behind)."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def refuse(main, argv, culprit, root, capsys):
    """Run main(argv) in-process; assert exit 2, one `error:` line containing `culprit`, nothing changed."""
    before = snapshot(root)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            if main(argv) == 2:  # scripts.dataset returns its exit code
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
         "tok_eval": tok_eval.main, "dataset": dataset.main, "report": report.main, "export": export.main,
         "chat_serve": chat_serve.main}

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
    ("base_train", ["--max-per-task", "0"], "--max-per-task"),
    ("base_train", ["--core-metric-max-per-task", "0"], "--core-metric-max-per-task"),  # the old spelling
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
    ("chat_eval", ["--max-per-task", "0"], "--max-per-task"),
    ("chat_eval", ["--max-problems", "0"], "--max-problems"),
    ("chat_eval", ["--temperature", "nan"], "--temperature"),
    ("chat_eval", ["--top-k", "0"], "--top-k"),
    ("chat_eval", ["--num-samples", "0"], "--num-samples"),
    ("chat_eval", ["--max-new-tokens", "-1"], "--max-new-tokens"),
    ("chat_eval", ["-b", "0"], "--device-batch-size"),
    ("chat_eval", ["--batch-size", "0"], "--batch-size"),
    ("chat_cli", ["-t", "nan"], "--temperature"),
    ("chat_cli", ["-t", "-1"], "--temperature"),
    ("chat_cli", ["-k", "0"], "--top-k"),
    ("chat_cli", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("base_eval", ["--max-per-task", "0"], "--max-per-task"),
    ("base_eval", ["--eval-tokens", "0"], "--eval-tokens"),
    ("base_eval", ["--split-tokens", "0"], "--split-tokens"),
    ("chat_sft", ["--eval-every", "0"], "--eval-every"),
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
    ("chat_serve", ["--port", "70000"], "--port"),
    ("chat_serve", ["--max-queue", "0"], "--max-queue"),
    ("chat_serve", ["-t", "inf"], "--temperature"),
]


# (stage, the old or nanochat spelling, this version's): both must parse to the same arguments
SPELLINGS = [
    ("base_train", ["--core-metric-max-per-task", "7"], ["--max-per-task", "7"]),
    ("base_train", ["-g", "d4"], ["--model-tag", "d4"]),
    ("base_eval", ["--split-tokens", "512"], ["--eval-tokens", "512"]),
    ("base_eval", ["-g", "d4", "-s", "3", "-x", "5"], ["--model-tag", "d4", "--step", "3", "--max-per-task", "5"]),
    ("chat_sft", ["-g", "d4", "-s", "3"], ["--model-tag", "d4", "--step", "3"]),
    ("chat_eval", ["--max-problems", "5"], ["--max-per-task", "5"]),
    ("chat_eval", ["--batch-size", "3"], ["--device-batch-size", "3"]),
    ("chat_eval", ["--task-name", "GSM8K"], ["--tasks", "GSM8K"]),
    ("chat_eval", ["-x", "5", "-b", "3", "-g", "d4", "-s", "2", "-t", "0.5", "-k", "9", "-n", "2", "-m", "7"],
     ["--max-per-task", "5", "--device-batch-size", "3", "--model-tag", "d4", "--step", "2", "--temperature", "0.5",
      "--top-k", "9", "--num-samples", "2", "--max-new-tokens", "7"]),
    ("chat_cli", ["-g", "d4", "-s", "3"], ["--model-tag", "d4", "--step", "3"]),
    ("chat_serve", ["-g", "d4", "-s", "3"], ["--model-tag", "d4", "--step", "3"]),
    ("export", ["--out", "x", "-g", "d4", "-s", "3"], ["--out", "x", "--model-tag", "d4", "--step", "3"]),
]
OLD_SPELLINGS = ["--core-metric-max-per-task", "--split-tokens", "--max-problems", "--batch-size", "--task-name"]


@pytest.mark.parametrize("stage,old,new", SPELLINGS, ids=[f"{s} {' '.join(o)}" for s, o, _ in SPELLINGS])
def test_old_and_short_spellings_parse_as_the_flags_they_stand_for(stage, old, new):
    module = {"base_train": base_train, "base_eval": base_eval, "chat_sft": chat_sft, "chat_eval": chat_eval,
              "chat_cli": chat_cli, "chat_serve": chat_serve, "export": export}[stage]
    required = ["--out", "x"] if stage == "export" else []
    assert vars(module.parse_args(old)) == vars(module.parse_args(new)) != vars(module.parse_args(required))


@pytest.mark.parametrize("module", [base_train, base_eval, chat_eval], ids=lambda m: m.__name__)
def test_help_shows_only_the_current_spellings(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert "--max-per-task" in shown and not any(old in shown for old in OLD_SPELLINGS)


@pytest.mark.parametrize("stage,argv,culprit", FLAGS, ids=[f"{s} {' '.join(a)}" for s, a, _ in FLAGS])
def test_bad_flag_is_refused_before_anything_runs(world, tmp_path, monkeypatch, capsys, stage, argv, culprit):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(world))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(world / "report"))
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    extra = TINY_BASE if stage == "base_train" else TINY_SFT if stage == "chat_sft" else []
    refuse(MAINS[stage], [*extra, *argv], culprit, world, capsys)


TAGS = ["../../x", "../x", "/tmp/x", "", "a/b", ".."]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("stage", ["base_train", "chat_sft", "base_eval", "chat_eval", "chat_cli", "export",
                                   "chat_serve"])
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
    (["scripts.dataset", "local", "--name", "x", "a", "b", "--weights", "inf,1"], "--weights"),
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


# --- files: each is checked when opened, and the error names it (and the line, for line-based files)

def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def conversation(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = json.dumps(conversation(("user", "hi"), ("assistant", "hello")))


@pytest.fixture
def no_sft(base):
    """The world without its SFT model, so chat_sft would really train if it accepted the input."""
    shutil.rmtree(base / "checkpoints" / "sft")
    return base


def first_core_task_file(base):
    return sorted((base / "data" / "synthetic" / "eval_bundle" / "eval_data").rglob("*.jsonl"))[0]


@pytest.mark.parametrize("files,culprit", [
    ({"a.txt": "hello " * 20, "b.txt": BAD_UTF8}, "b.txt:1: not UTF-8"),
    ({"a.jsonl": b'{"text": "ok"}\n\n{"text": "fine"}\n{"text": "caf\xe9"}\n'}, "a.jsonl:4: not UTF-8"),
    ({"a.jsonl": '{"text": "ok"}\n{"text": "fine"}\n{"text": 5}\n'}, "a.jsonl:3: \"text\" is int"),
    ({"a.jsonl": '{"text": "ok"}\n{"text": "fine"}\n{"text": null}\n'}, "a.jsonl:3: \"text\" is NoneType"),
    ({"a.jsonl": '{"text": "ok"}\n{"oops\n'}, "a.jsonl:2"),
    ({"a.parquet": pa.table({"text": [1, 2, 3]})}, "a.parquet: column `text` holds int64"),
    ({"a.parquet": pa.table({"body": ["a", "b"]})}, "a.parquet has no `text` column"),
    ({"a.parquet": b"PAR1 not parquet"}, "corrupt parquet file"),
], ids=["txt-latin1", "jsonl-latin1", "jsonl-int-text", "jsonl-null-text", "jsonl-bad-json", "parquet-int-text",
        "parquet-no-text", "parquet-garbage"])
def test_bad_local_data_file(base, capsys, files, culprit):
    folder = base.parent / "mine"
    for name, content in files.items():
        if isinstance(content, pa.Table):
            folder.mkdir(exist_ok=True)
            pq.write_table(content, folder / name)
        else:
            write(folder / name, content)
    refuse(dataset.main, ["local", "--name", "mine", str(folder)], culprit, base.parent, capsys)


def test_pretraining_shard_with_a_non_text_column(base, capsys):
    shard = base / "data" / "synthetic" / "shard_00000.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), shard)
    manifest = json.loads((shard.parent / "manifest.json").read_text())  # as if a mirror had served this shard
    manifest["shards"][0].update(bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (shard.parent / "manifest.json").write_text(json.dumps(manifest))
    refuse(tok_train.main, ["--vocab-size", "300"], "shard_00000.parquet: column `text` holds int64", base.parent,
           capsys)


def test_tokenizer_file_that_is_not_a_tokenizer(base, capsys):
    write(base / "tokenizer" / "tokenizer.json", b"\x00garbage")
    refuse(tok_eval.main, [], "tokenizer.json", base.parent, capsys)


@pytest.mark.parametrize("break_bundle,culprit", [
    (lambda b: write(b / "core.yaml", BAD_UTF8), "core.yaml:1: not UTF-8"),
    (lambda b: write(b / "core.yaml", "icl_tasks: [unclosed\n"), "core.yaml: not valid YAML"),
    (lambda b: write(b / "eval_meta_data.csv", b"Eval Task,Random baseline\n" + BAD_UTF8), "eval_meta_data.csv:2"),
    (lambda b: shutil.rmtree(b / "eval_data"), "task files named in"),
], ids=["yaml-latin1", "yaml-broken", "csv-latin1", "every-task-file-missing"])
def test_bad_core_bundle(base, capsys, break_bundle, culprit):
    break_bundle(base / "data" / "synthetic" / "eval_bundle")
    refuse(base_eval.main, ["--eval", "core", "--device", "cpu"], culprit, base.parent, capsys)


@pytest.mark.parametrize("content,where", [(b"\n" + BAD_UTF8, ":2: not UTF-8"), (b"{oops\n", ":1")],
                         ids=["latin1", "bad-json"])
def test_bad_core_task_file(base, capsys, content, where):
    task_file = first_core_task_file(base)
    with open(task_file, "rb") as f:
        lines = f.read().count(b"\n")
    with open(task_file, "ab") as f:
        f.write(content)
    line = lines + int(where.split(":")[1])
    refuse(base_eval.main, ["--eval", "core", "--device", "cpu"], f"{task_file.name}:{line}", base.parent, capsys)


def test_bad_core_task_file_is_found_before_pretraining(base, capsys):
    task_file = first_core_task_file(base)
    with open(task_file, "ab") as f:
        f.write(b"{oops\n")
    flags = [*TINY_BASE, "--core-metric-every", "100", "--model-tag", "with_core"]  # CORE would run at the end
    refuse(base_train.main, flags, f"{task_file.name}:", base.parent, capsys)


def test_text_file_to_evaluate_that_is_not_utf8(base, capsys):
    write(base.parent / "notes.txt", b"fine line\n" + BAD_UTF8)
    refuse(base_eval.main, ["--eval", "text", "--text", "notes.txt", "--device", "cpu"], "notes.txt:2: not UTF-8",
           base.parent, capsys)


# --- conversations: validated whole before training or scoring starts

def append_row(path, row):
    with open(path, "ab") as f:
        f.write((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n")
    with open(path, "rb") as f:
        return f.read().count(b"\n")  # the line number of the row just written


CHAT = ("data", "synthetic", "chat")


@pytest.mark.parametrize("stem,row,problem", [
    ("sft_train", conversation(("assistant", "x")), "malformed SyntheticSFT example"),
    ("sft_train", conversation(("user", 5), ("assistant", "x")), "(user) content must be a string, got int"),
    ("sft_train", BAD_UTF8.rstrip(), "not UTF-8"),
    ("sft_val", {"messages": "hi"}, "malformed SyntheticSFT example"),
], ids=["train-wrong-role", "train-int-content", "train-latin1", "val-not-a-list"])
def test_bad_sft_conversation_is_found_before_training(no_sft, capsys, stem, row, problem):
    path = no_sft.joinpath(*CHAT, f"{stem}.jsonl")
    line = append_row(path, row)  # the last line: a run of a few steps would never reach it
    message = refuse(chat_sft.main, TINY_SFT, f"{path}:{line}", no_sft.parent, capsys)
    assert problem in message


@pytest.mark.parametrize("content,culprit", [
    (BAD_UTF8, "identity_conversations.jsonl:1: not UTF-8"),
    (GOOD + "\n" + json.dumps([{"role": "assistant", "content": "x"}]) + "\n",
     "identity_conversations.jsonl:2: malformed conversation"),
    (GOOD + "\n\n5\n", "identity_conversations.jsonl:3: malformed conversation"),
], ids=["latin1", "wrong-role", "a-number"])
def test_bad_identity_file(no_sft, capsys, content, culprit):
    write(no_sft / "chat_data" / "identity" / "identity_conversations.jsonl", content)
    refuse(chat_sft.main, [*TINY_SFT, "--mixture", "identity,synthetic"], culprit, no_sft.parent, capsys)


@pytest.mark.parametrize("stem,row,problem", [
    ("eval_world_mc", conversation(("user", "q"), ("assistant", "A")), "'letters'"),
    ("eval_world_arith", {**conversation(("user", "q"), ("assistant", "4")), "answer": "four"}, "numeric 'answer'"),
], ids=["mc-without-letters", "arith-without-number"])
def test_bad_chat_eval_item_is_found_before_scoring(base, capsys, stem, row, problem):
    path = base.joinpath(*CHAT, f"{stem}.jsonl")
    line = append_row(path, row)
    message = refuse(chat_eval.main, ["--max-per-task", "2", "--device", "cpu"], f"{path}:{line}", base.parent, capsys)
    assert problem in message


@pytest.mark.parametrize("table,culprit", [
    (pa.table({"x": [1, 2]}), "has no column question, answer"),
    (pa.table({"question": ["q", "r"], "answer": [4, 7]}), "test-00000-of-00001.parquet row 0: malformed GSM8K"),
], ids=["no-columns", "int-answer"])
def test_bad_chat_data_parquet(base, capsys, table, culprit):
    path = base / "chat_data" / "gsm8k" / "main" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    refuse(chat_eval.main, ["-a", "GSM8K", "--device", "cpu"], culprit, base.parent, capsys)


# --- chat input

def test_chat_input_that_is_not_utf8(base, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(BAD_UTF8), encoding="utf-8"))
    refuse(chat_cli.main, ["--device", "cpu", "--max-new-tokens", "4"], "not UTF-8", base.parent, capsys)


def test_chat_prompt_that_is_not_utf8(base, capsys):
    refuse(chat_cli.main, ["-p", "caf\udce9", "--device", "cpu"], "--prompt: not UTF-8", base.parent, capsys)


def test_chat_input_that_is_not_utf8_in_a_real_process(base):
    before = snapshot(base.parent)
    r = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device", "cpu", "--max-new-tokens", "4"],
                       input=BAD_UTF8, env=subprocess_env(), capture_output=True, timeout=300, cwd=base.parent)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "error: the input is not UTF-8 text: use a UTF-8 terminal or locale (e.g. LANG=C.UTF-8)"]
    assert snapshot(base.parent) == before
