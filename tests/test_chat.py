"""SFT, chat evaluation and the chat CLI on a tiny real pipeline built once for this module: the synthetic
world, a 512-token tokenizer, a few steps of pretraining."""

import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanopipe import report
from nanopipe.chat_eval import chatcore, evaluate_categorical
from nanopipe.checkpoint import checkpoint_root, list_steps, load_checkpoint, step_dir
from nanopipe.common import get_base_dir
from nanopipe.engine import Engine, ReplyDecoder
from nanopipe.training import read_log
from scripts import base_train, chat_cli, chat_eval, chat_sft
from tasks.world.chat import DEMO_PROMPTS
from tasks.world.tasks import SyntheticSFT, WorldMC
from tests.conftest import one_thread, subprocess_env, synthetic_world

# val loss at step 0 and at the end only (these runs are shorter than 1,000 steps)
SFT_FLAGS = ["--device-batch-size", "4", "--val-conversations", "24", "--eval-every", "1000", "--device", "cpu"]


def run(main, argv):
    with one_thread():
        main(argv)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_world")
    with synthetic_world(base):
        run(base_train.main, ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "128",
                              "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "8",
                              "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
                              "--device", "cpu", "--model-tag", "d2"])
    return base


@pytest.fixture
def in_world(world, monkeypatch):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(world))
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    for kind in ("sft",):
        shutil.rmtree(world / "checkpoints" / kind, ignore_errors=True)
    return world


def test_chatcore_is_the_mean_centered_accuracy():
    results = {"ARC-Easy": {"accuracy": 0.55, "baseline": 0.25}, "GSM8K": {"accuracy": 0.1, "baseline": 0.0}}
    assert chatcore(results) == pytest.approx(((0.55 - 0.25) / 0.75 + 0.1) / 2)
    assert chatcore({}) is None


def test_sft_lowers_val_loss_and_reports(in_world):
    run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "12"])
    section = report.read_sections()["chat_sft"]["data"]
    assert section["val_loss"] < section["initial_val_loss"] - 0.3
    assert section["rows"] == {"synthetic": len(SyntheticSFT("train"))}
    log = read_log(get_base_dir() / "logs" / "sft-d2.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    assert all(r["trained_tokens"] > 0 for r in log if "loss" in r)


def test_sft_resume_gives_the_same_weights(in_world):
    run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "6", "--save-every", "2", "--keep-last", "10"])
    ckpt_dir = checkpoint_root("sft") / "d2"
    straight = load_checkpoint(ckpt_dir, 6)["model"]
    for step in list_steps(ckpt_dir):  # as if killed right after the step-2 checkpoint was written
        if step > 2:
            shutil.rmtree(step_dir(ckpt_dir, step))
    run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "6", "--save-every", "2", "--keep-last", "10", "--resume"])
    resumed = load_checkpoint(ckpt_dir, 6)["model"]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sft_refuses_to_overwrite_without_resume(in_world, capsys):
    run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "1"])
    with pytest.raises(SystemExit) as e:
        run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "1"])
    assert e.value.code == 2
    assert "--resume" in capsys.readouterr().err


def test_sft_out_of_memory_in_the_first_step_names_a_smaller_batch(in_world, capsys):
    def hook(module, inputs):  # the first forward of the first step runs out, as CUDA's allocator would raise
        handle.remove()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with pytest.raises(SystemExit) as e:
            run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "2", "--eval-every", "-1"])
    finally:
        handle.remove()
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: out of memory in the first step with --device-batch-size 4: use --device-batch-size 2 "
                      "or less with --total-batch-size 512 (the total batch stays the same by accumulation)"], err
    assert "Traceback" not in err and not list_steps(checkpoint_root("sft") / "d2")


def test_chat_eval_and_cli(in_world):
    run(chat_sft.main, [*SFT_FLAGS, "--num-iterations", "2"])
    run(chat_eval.main, ["-i", "sft", "--max-per-task", "4", "--max-new-tokens", "8", "--tool-ablation",
                         "--device", "cpu"])
    data = report.read_sections()["chat_eval_sft"]["data"]
    assert set(data["tasks"]) == {"world_mc", "world_facts", "world_arith", "world_spell"}
    assert all(t["n"] == 4 for t in data["tasks"].values())
    assert "accuracy_no_tools" in data["tasks"]["world_arith"]
    assert data["chatcore"] == pytest.approx(chatcore(data["tasks"]))
    assert (get_base_dir() / "chat_eval" / "sft_transcripts.md").exists()

    question = "What is 6 times 7?"
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", question, "-t", "0",
                             "--max-new-tokens", "8"], env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # the printed answer is the SFT model's own greedy reply to the question as the chat shows it, one line
    from nanopipe.checkpoint import load_model
    model, tokenizer, _ = load_model("sft", device="cpu")
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": question},
                                                           {"role": "assistant", "content": ""}]})
    reply = Engine(model, tokenizer).generate_batch(prompt, max_tokens=8, temperature=0.0)[0][len(prompt):]
    assert reply, "the greedy reply is empty: the comparison would say nothing"
    decoder = ReplyDecoder(tokenizer)
    assert result.stdout == "".join(decoder.feed(t) for t in reply) + decoder.flush() + "\n"

    # --demo asks the README's prompts, each in a new conversation: the first reply is the same greedy reply
    # as -p gives for that prompt alone
    demo = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--demo", "-t", "0", "--max-new-tokens", "8"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr[-2000:]
    asked = re.findall(r"^you> (.*)$", demo.stdout, re.MULTILINE)
    assert asked == [prompt for prompt, _ in DEMO_PROMPTS]
    alone = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-p", asked[-1], "-t", "0",
                            "--max-new-tokens", "8"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert demo.stdout.endswith(f"you> {asked[-1]}\nbot> {alone.stdout}")


def test_categorical_scoring_is_batch_size_independent(in_world):
    from nanopipe.checkpoint import load_model
    model, tokenizer, _ = load_model("base", "d2", device="cpu")
    task = WorldMC()[:12]
    assert evaluate_categorical(model, tokenizer, task, batch_size=1) == \
        evaluate_categorical(model, tokenizer, task, batch_size=12)


def test_cli_history_is_truncated_from_the_oldest_turns(in_world):
    from nanopipe.checkpoint import load_model
    _, tokenizer, _ = load_model("base", "d2", device="cpu")
    messages = []
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": "ok " * 10}]
    messages.append({"role": "user", "content": "last question"})
    kept, prompt = chat_cli.fit_to_context(tokenizer, messages, budget=200)
    assert len(prompt) <= 200
    assert kept[-1]["content"] == "last question" and kept[0]["role"] == "user"
    assert len(kept) < len(messages)
    assert kept == messages[len(messages) - len(kept):]
