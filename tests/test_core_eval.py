import json
import random
import warnings

import pytest
import torch

from nanopipe.common import UserError
from nanopipe.core_eval import (centered, crop_left, evaluate_core, evaluate_task,
                                fewshot_indices, find_spans, load_bundle, prepare_task, render_prompts,
                                select_items)
from tasks.world.core import CORE_TASKS
from tasks.world.facts import sample_prompts
from tests.conftest import noisy_gpt


MC = [
    {"query": "Q: 2+2?", "choices": ["3", "4", "5"], "gold": 1},
    {"query": "Q: capital of France?", "choices": ["Paris", "Rome"], "gold": 0},
]
SCHEMA = [
    {"context_options": ["The cat sat because the cat", "The cat sat because the mat"], "continuation": "was tired.",
     "gold": 0},
    {"context_options": ["Ann beat Bob so Ann", "Ann beat Bob so Bob"], "continuation": "was happy.", "gold": 0},
]
LM = [
    {"context": "  The capital of France is  ", "continuation": "Paris"},
    {"context": "One two three", "continuation": "four"},
]


# -----------------------------------------------------------------------------
# rendering

def test_render_multiple_choice_with_fewshot():
    prompts = render_prompts("multiple_choice", MC[0], [MC[1]], "\nAnswer: ")
    shot = "Q: capital of France?\nAnswer: Paris\n\n"
    assert prompts == [shot + "Q: 2+2?\nAnswer: 3", shot + "Q: 2+2?\nAnswer: 4", shot + "Q: 2+2?\nAnswer: 5"]


def test_render_schema_with_fewshot():
    prompts = render_prompts("schema", SCHEMA[0], [SCHEMA[1]], " ")
    shot = "Ann beat Bob so Ann was happy.\n\n"
    assert prompts == [shot + "The cat sat because the cat was tired.", shot + "The cat sat because the mat was tired."]


def test_render_language_modeling_strips_contexts():
    without, with_ = render_prompts("language_modeling", LM[0], [LM[1]], " ")
    assert with_ == "One two three four\n\nThe capital of France is Paris"
    assert without == "One two three four\n\nThe capital of France is"   # trailing delimiter stripped
    without, with_ = render_prompts("language_modeling", LM[0], [], "\nAnswer: ")
    assert without == "The capital of France is\nAnswer:"
    assert with_ == "The capital of France is\nAnswer: Paris"


def test_render_zero_shot():
    assert render_prompts("multiple_choice", MC[1], [], " ") == ["Q: capital of France? Paris",
                                                                "Q: capital of France? Rome"]


# -----------------------------------------------------------------------------
# spans

def test_spans_multiple_choice_after_common_prefix():
    bos = 0
    seqs = [[bos, 5, 6, 7, 10], [bos, 5, 6, 7, 11, 12], [bos, 5, 6, 8]]
    assert find_spans("multiple_choice", seqs) == [(seqs[0], 3, 5), (seqs[1], 3, 6), (seqs[2], 3, 4)]


def test_spans_multiple_choice_choice_that_is_prefix_of_another_keeps_a_token():
    seqs = [[0, 5, 6], [0, 5, 6, 7]]
    spans = find_spans("multiple_choice", seqs)
    assert spans == [(seqs[0], 2, 3), (seqs[1], 3, 4)]   # never empty


def test_spans_schema_common_suffix():
    seqs = [[0, 1, 2, 9, 9, 20, 21], [0, 1, 3, 20, 21]]
    assert find_spans("schema", seqs) == [(seqs[0], 5, 7), (seqs[1], 3, 5)]


def test_spans_language_modeling_prefix():
    without, with_ = [0, 4, 5, 6], [0, 4, 5, 6, 7, 8]
    assert find_spans("language_modeling", [without, with_]) == [(with_, 4, 6)]
    # if tokenization merged across the boundary, the common prefix is used
    assert find_spans("language_modeling", [[0, 4, 5, 9], with_]) == [(with_, 3, 6)]


def test_crop_left_keeps_the_end_and_shifts_the_span():
    tokens = list(range(10))
    assert crop_left(tokens, 7, 10, 4) == ([6, 7, 8, 9], 1, 4)
    assert crop_left(tokens, 8, 10, 4) == ([6, 7, 8, 9], 2, 4)
    assert crop_left(tokens, 8, 10, None) == (tokens, 8, 10)
    assert crop_left(tokens, 2, 10, 4) == ([6, 7, 8, 9], 1, 4)   # span start never on position 0


# -----------------------------------------------------------------------------
# sampling

def test_select_items_is_reference_shuffle_then_cut():
    items = list(range(50))
    expected = list(range(50))
    random.Random(1337).shuffle(expected)
    assert select_items(items, -1) == expected
    assert select_items(items, 7) == expected[:7]
    assert items == list(range(50))   # not shuffled in place


def test_fewshot_indices_match_reference_and_cap_k():
    assert fewshot_indices(3, 12, 10) == random.Random(1234 + 3).sample([j for j in range(12) if j != 3], 10)
    assert fewshot_indices(0, 3, 10) == random.Random(1234).sample([1, 2], 2)   # k > n - 1 (nanochat#550)
    assert fewshot_indices(0, 1, 5) == []
    assert fewshot_indices(5, 12, 0) == []


def test_centered_accuracy():
    assert centered(0.25, 0.25) == 0.0
    assert centered(1.0, 0.25) == 1.0
    assert centered(0.5, 0) == 0.5
    assert centered(0.0, 0.5) == -1.0


# -----------------------------------------------------------------------------
# bundles

def write_bundle(root, tasks, baselines=None):
    """tasks: list of (label, type, uri, num_fewshot, delimiter or None, rows or None (file absent))."""
    import yaml
    entries = []
    for label, task_type, uri, k, delim, rows in tasks:
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [k], "icl_task_type": task_type}
        if delim is not None:
            entry["continuation_delimiter"] = delim
        entries.append(entry)
        if rows is not None:
            path = root / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    lines = ["Eval Task,Task Category,Random baseline"]
    for label, *_ in tasks:
        lines.append(f"{label},x,{(baselines or {}).get(label, 25)}")
    (root / "eval_meta_data.csv").write_text("\n".join(lines) + "\n")
    return root


def test_load_bundle_skips_missing_files_with_warning(tmp_path):
    write_bundle(tmp_path, [("mc", "multiple_choice", "a/mc.jsonl", 1, None, MC),
                            ("gone", "language_modeling", "a/gone.jsonl", 0, None, None),
                            ("lm", "language_modeling", "b/lm.jsonl", 0, "\nA: ", LM)])
    with pytest.warns(UserWarning, match="gone"):
        tasks, missing = load_bundle(tmp_path)
    assert [t.label for t in tasks] == ["mc", "lm"] and missing == ["gone"]
    assert tasks[0].delimiter == " " and tasks[1].delimiter == "\nA: "
    assert tasks[0].random_baseline == 25.0 and tasks[0].num_fewshot == 1
    assert tasks[1].items == LM


@pytest.mark.parametrize("bad_row, message", [
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "choices"),
    ('{"choices": ["a", "b"], "gold": 0}', "query"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
])
def test_bad_row_names_file_and_line(tmp_path, bad_row, message):
    write_bundle(tmp_path, [("mc", "multiple_choice", "mc.jsonl", 0, None, MC)])
    path = tmp_path / "eval_data" / "mc.jsonl"
    path.write_text(path.read_text() + "\n" + bad_row + "\n")   # line 3 is blank, the bad row is line 4
    with pytest.raises(UserError, match=rf"mc\.jsonl:4: .*{message}"):
        load_bundle(tmp_path)


def test_bundle_errors(tmp_path):
    with pytest.raises(UserError, match="no core.yaml"):
        load_bundle(tmp_path)
    write_bundle(tmp_path, [("mc", "multiple_choice", "mc.jsonl", 0, None, MC)])
    (tmp_path / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nother,25\n")
    with pytest.raises(UserError, match="no 'Random baseline' for task 'mc'"):
        load_bundle(tmp_path)
    write_bundle(tmp_path, [("mc", "ranking", "mc.jsonl", 0, None, MC)])
    with pytest.raises(UserError, match="unknown icl_task_type"):
        load_bundle(tmp_path)


# -----------------------------------------------------------------------------
# with a real (tiny) tokenizer and model

def test_spans_with_real_tokenizer(tokenizer):
    bos = tokenizer.bos_token_id
    # LM with trailing spaces in the context: the stripped without-prompt is a token prefix of the with-prompt
    item = {"context": "The capital of Quen is   ", "continuation": "Lorv"}
    without, with_ = render_prompts("language_modeling", item, [], " ")
    toks = tokenizer.encode([without, with_], prepend=bos)
    assert toks[1][:len(toks[0])] == toks[0]
    [(tokens, start, end)] = find_spans("language_modeling", toks)
    assert tokens[0] == bos and tokenizer.decode(tokens[start:end]) == " Lorv"
    # MC: the span is exactly each choice
    mc = {"query": "The capital of Quen is", "choices": ["Lorv", "Besk town"], "gold": 0}
    spans = find_spans("multiple_choice", tokenizer.encode(render_prompts("multiple_choice", mc, [], " "), prepend=bos))
    assert [tokenizer.decode(t[s:e]) for t, s, e in spans] == [" Lorv", " Besk town"]
    # schema: the span is the shared continuation
    sc = {"context_options": ["Ann met Bob so Ann", "Ann met Bob so the dog"], "continuation": "was glad.", "gold": 0}
    spans = find_spans("schema", tokenizer.encode(render_prompts("schema", sc, [], " "), prepend=bos))
    assert [tokenizer.decode(t[s:e]) for t, s, e in spans] == [" was glad."] * 2


def test_over_long_prompts_keep_their_end(tokenizer, tmp_path):
    items = [{"query": f"Question {i}: which word comes after {i} apples and pears?", "choices": ["one", "two words"],
              "gold": i % 2}
             for i in range(6)]
    write_bundle(tmp_path, [("mc", "multiple_choice", "mc.jsonl", 5, None, items)])
    tasks, _ = load_bundle(tmp_path)
    data = select_items(tasks[0].items)
    full, _ = prepare_task(tasks[0], tokenizer, data, range(len(data)), None)
    cropped, plan = prepare_task(tasks[0], tokenizer, data, range(len(data)), 24)
    assert max(len(t) for t, _, _ in full) > 24
    for (ft, fs, fe), (ct, cs, ce) in zip(full, cropped):
        assert len(ct) == min(len(ft), 24) and ct == ft[-len(ct):]
        assert ct[cs:ce] == ft[fs:fe]                       # the scored span survives the crop
    assert [count for _, count, _ in plan] == [2] * 6


def test_batch_size_does_not_change_results(tokenizer, tmp_path):
    from nanopipe.core_eval import score_sequences
    from tasks.world.core import core_items
    items = core_items(0)
    tasks = [(label, task_type, f"world/{label}.jsonl", k, None, items[label][:8])
             for label, task_type, k in [("world_facts_mc", "multiple_choice", 3), ("world_facts_schema", "schema", 0),
                                         ("world_facts_lm", "language_modeling", 5),
                                         ("world_arith_lm", "language_modeling", 5)]]
    write_bundle(tmp_path, tasks)
    model = noisy_gpt(tokenizer, seq_len=256)
    bundle_tasks, _ = load_bundle(tmp_path)
    for task in bundle_tasks:
        data = select_items(task.items)
        sequences, _ = prepare_task(task, tokenizer, data, range(len(data)), 64)
        one = score_sequences(model, sequences, tokenizer.bos_token_id, "cpu", batch_size=1)
        many = score_sequences(model, sequences, tokenizer.bos_token_id, "cpu", batch_size=7)
        # the kernels picked for a batch's shape may move a loss's last bits, never an outcome
        assert [outcome for _, outcome in one] == [outcome for _, outcome in many]
        assert [loss for loss, _ in one] == pytest.approx([loss for loss, _ in many], rel=1e-6)
        assert evaluate_task(model, tokenizer, task, "cpu", batch_size=1, max_seq_len=64) == \
            evaluate_task(model, tokenizer, task, "cpu", batch_size=64, max_seq_len=64)


def test_evaluate_core_on_synthetic_world(tokenizer, tmp_path):
    from tasks.world.core import write_core_bundle
    from tasks.world.facts import build_world
    write_core_bundle(0, build_world(0), tmp_path)
    model = noisy_gpt(tokenizer, seq_len=256)
    result = evaluate_core(model, tokenizer, tmp_path, "cpu", max_per_task=6, batch_size=8)
    tasks, missing = load_bundle(tmp_path)
    assert missing == [] and result["core_tasks"] == result["core_tasks_total"] == len(tasks)
    assert set(result["tasks"]) == {t.label for t in tasks}
    for task in tasks:
        r = result["tasks"][task.label]
        assert r["n"] == 6 and 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0
        assert r["random_baseline"] == task.random_baseline
        assert r["centered"] == pytest.approx(centered(r["accuracy"], task.random_baseline / 100))
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values()) / len(tasks))


def test_real_sample_bundle(tokenizer, shared_data):
    bundle = shared_data / "core_sample"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks, missing = load_bundle(bundle)
    assert sorted(missing) == ["coqa", "squad"] and len(tasks) == 20
    assert sum("missing" in str(w.message) for w in caught) == 2
    by_label = {t.label: t for t in tasks}
    assert by_label["jeopardy"].delimiter == "\nAnswer: " and by_label["jeopardy"].num_fewshot == 10
    assert by_label["bigbench_language_identification"].random_baseline == 9.1
    model = noisy_gpt(tokenizer, seq_len=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_core(model, tokenizer, bundle, "cpu", max_per_task=2, batch_size=16)
    assert (result["core_tasks"], result["core_tasks_total"]) == (20, 22)
    assert sorted(result["missing_tasks"]) == ["coqa", "squad"]
    assert all(r["n"] == 2 for r in result["tasks"].values())


def _ddp_worker(rank, world_size, port, tokenizer_dir, model_path, bundle, out_dir):
    import os
    import torch.distributed as dist
    from nanopipe.core_eval import evaluate_core
    from nanopipe.tokenizer import Tokenizer
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = torch.load(model_path, weights_only=False)
    result = evaluate_core(model, tokenizer, bundle, "cpu", max_per_task=7, batch_size=4, show_progress=False)
    torch.save({k: (v["accuracy"], v["n"]) for k, v in result["tasks"].items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tokenizer, tmp_path):
    import socket
    import torch.multiprocessing as mp
    from tasks.world.core import write_core_bundle
    from tasks.world.facts import build_world
    bundle = tmp_path / "bundle"
    write_core_bundle(0, build_world(0), bundle)
    model = noisy_gpt(tokenizer, seq_len=256)
    tokenizer.save(tmp_path / "tok")
    torch.save(model, tmp_path / "model.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "tok"), str(tmp_path / "model.pt"), str(bundle), str(tmp_path)),
             nprocs=2)
    single = evaluate_core(model, tokenizer, bundle, "cpu", max_per_task=7, batch_size=4)
    expected = {k: (v["accuracy"], v["n"]) for k, v in single["tasks"].items()}
    assert torch.load(tmp_path / "rank0.pt") == expected == torch.load(tmp_path / "rank1.pt")


def test_shared_prefix_path_matches_full_sequences(tokenizer, tmp_path):
    from nanopipe.core_eval import score_sequences, score_task, score_with_shared_prefix, shared_prefix_len
    from tasks.world.core import core_items
    items = core_items(0)["world_facts_mc"][:6]
    write_bundle(tmp_path, [("mc", "multiple_choice", "mc.jsonl", 3, None, items)])
    [task], _ = load_bundle(tmp_path)
    data = select_items(task.items)
    sequences, plan = prepare_task(task, tokenizer, data, range(len(data)), None)
    model = noisy_gpt(tokenizer, seq_len=256)
    bos = tokenizer.bos_token_id
    full = score_sequences(model, sequences, bos, "cpu", batch_size=4)
    for first, count, _ in plan:
        item = sequences[first:first + count]
        assert shared_prefix_len(item) >= 0.5 * max(len(t) for t, _, _ in item)   # 3-shot MC: the prefix dominates
        shared = score_with_shared_prefix(model, item, bos, "cpu")
        for (loss_a, ok_a), (loss_b, ok_b) in zip(shared, full[first:first + count]):
            assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=1e-5) and ok_a == ok_b
    # the dispatcher sends these items down the shared path, independently of the batch size
    assert score_task(model, sequences, plan, bos, "cpu", 1) == score_task(model, sequences, plan, bos, "cpu", 16)


def test_base_eval_script_end_to_end(tokenizer, tmp_path, isolated_dirs):
    """scripts.base_eval on the synthetic world with a saved (untrained) checkpoint: every eval, one report."""
    import os
    from pathlib import Path
    from nanopipe.checkpoint import save_checkpoint
    from nanopipe.common import get_base_dir
    from tasks.world.source import build_synthetic
    from scripts import base_eval
    build_synthetic(num_shards=2)
    tokenizer.save(get_base_dir() / "tokenizer")
    save_checkpoint(get_base_dir() / "checkpoints" / "base" / "d2", 5, noisy_gpt(tokenizer, seq_len=64), [], {})
    text = tmp_path / "mine.txt"
    text.write_text("The capital of Quen is Lorv. 12 + 30 = 42.\n")
    base_eval.main(["--data", "synthetic", "--max-per-task", "4", "--device-batch-size", "4", "--eval-tokens", "512",
                    "--eval", "core,bpb,sample,text", "--text", str(text)])
    report = Path(os.environ["NANOPIPE_REPORT_DIR"]) / "sections" / "04-base_eval.json"
    data = json.loads(report.read_text())["data"]
    assert data["core_tasks"] == data["core_tasks_total"] == len(data["tasks"]) == len(CORE_TASKS)
    assert all(t["n"] == 4 for t in data["tasks"].values())
    assert set(data["bpb"]) == {"train", "val"} and all(0 < v < 20 for v in data["bpb"].values())
    prompts = sample_prompts()  # the synthetic world's model is asked about its own world
    assert len(data["samples"]) == len(prompts)
    assert all(sample.startswith(prompt) for sample, prompt in zip(data["samples"], prompts))
    assert list(data["text"])[0] == "bpb" and data["text"]["tokens"] > 0


def test_base_eval_script_errors(isolated_dirs, capsys):
    from scripts import base_eval
    with pytest.raises(SystemExit) as exit_info:
        base_eval.main(["--eval", "core"])
    assert exit_info.value.code == 2
    assert "run `python -m scripts.base_train` first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        base_eval.main(["--eval", "text"])          # --eval text needs --text
    with pytest.raises(SystemExit):
        base_eval.main(["--eval", "core,bleu"])
