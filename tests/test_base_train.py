"""base_train end to end on a tiny real dataset and tokenizer: exact resume after SIGKILL, DDP equivalence,
the divergence guard, the derived plan, and loading the result for later stages."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from dataclasses import asdict

import pytest
import torch

from nanopipe import shard_writer, shards
from nanopipe.checkpoint import (checkpoint_root, clean_state_dict, find_last_step, list_steps, load_checkpoint,
                                 load_model, load_weights, rng_state, save_checkpoint, set_rng_state)
from nanopipe.common import UserError, get_base_dir
from nanopipe.gpt import build_model, config_from_depth
from nanopipe.memory import FITS_FRACTION, GIB, predict_peaks
from nanopipe.optim import setup_optimizers
from nanopipe.pretrain import PretrainLoopState, lr_multiplier, make_plan, muon_momentum, muon_weight_decay
from nanopipe.tokenizer import Tokenizer
from scripts import base_train
from tests.conftest import subprocess_env

WORDS = ("the a river stone cloud seven green quick brown fox jumps over lazy dog city paris france capital "
         "of is and blue sky red sun moon night day water fire").split()
SEQ = 32


def make_doc(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "."


def train_tokenizer(docs):
    tokenizer = Tokenizer.train(iter(docs), vocab_size=300)
    tokenizer.save(get_base_dir() / "tokenizer")
    return tokenizer


@pytest.fixture
def toy_data(isolated_dirs):
    """data/toy (2 train shards + val) and a 300-token tokenizer under the test's base dir."""
    rng = random.Random(0)
    docs = [make_doc(rng) for _ in range(1200)]
    with shard_writer.ShardWriter(shards.dataset_dir("toy"), docs_per_shard=500, row_group_size=100) as writer:
        for text in docs:
            writer.write(text)
    train_tokenizer(docs[:500])
    return isolated_dirs


TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", str(SEQ),
        "--device-batch-size", "2", "--core-metric-every", "-1", "--sample-every", "-1", "--device", "cpu"]


def run_train(*flags, check=True, nproc=1, timeout=120):
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.base_train", *TINY, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.base_train", *TINY, *flags]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_in_process(capsys, *flags) -> tuple[int, str, str]:
    """base_train's main() in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1): tiny ops are slower on 2
    code = 0
    try:
        base_train.main([*TINY, *flags])
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def read_log(tag):
    path = get_base_dir() / "logs" / f"{tag}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_weights(tag):
    ckpt_dir = checkpoint_root("base") / tag
    last = list_steps(ckpt_dir)[-1]
    return last, load_weights(ckpt_dir / f"step_{last:06d}")


def test_resume_after_sigkill_is_bitwise_exact(toy_data, capsys):
    flags = ["--data", "toy", "--num-iterations", "20", "--total-batch-size", "128", "--eval-every", "10",
             "--eval-tokens", "128", "--save-every", "1", "--keep-last", "2"]
    assert train_in_process(capsys, *flags, "--model-tag", "d2")[0] == 0

    # the same run, killed hard at a random step, then resumed
    cmd = [sys.executable, "-m", "scripts.base_train", *TINY, *flags, "--model-tag", "killed"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at = random.Random().randint(2, 10)
    log_path = get_base_dir() / "logs" / "killed.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if log_path.exists() and any(json.loads(l).get("step", 0) >= kill_at
                                     for l in log_path.read_text().splitlines() if l.endswith("}")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(list_steps(checkpoint_root("base") / "killed"))
    assert killed_at < 20
    run_train(*flags, "--model-tag", "killed", "--resume")

    step_a, weights_a = final_weights("d2")
    step_b, weights_b = final_weights("killed")
    assert step_a == step_b == 20
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key

    # the log of the resumed run has each step once, with the same losses as the uninterrupted one
    log_a, log_b = read_log("d2"), read_log("killed")
    train_a = {r["step"]: r["loss"] for r in log_a if "loss" in r}
    train_b = [(r["step"], r["loss"]) for r in log_b if "loss" in r]
    assert [s for s, _ in train_b] == list(range(1, 21))
    assert all(train_a[s] == loss for s, loss in train_b)
    for record in log_a:
        if "loss" in record:
            assert {"step", "loss", "lr", "dt", "tok_per_sec", "mfu", "grad_norm"} <= record.keys()
            assert record["mfu"] is None  # CPU: no peak FLOPs, so no MFU
    assert [r["step"] for r in log_a if "val_bpb" in r] == [0, 10, 20]  # 20: the final eval, after the save
    assert len(list_steps(checkpoint_root("base") / "d2")) == 2  # --keep-last 2

    # the report section and loading the model for the next stages
    section = json.loads(next((toy_data.parent / "report" / "sections").glob("*base_train.json")).read_text())
    data = section["data"]
    assert data["num_steps"] == 20 and data["tokens"] == 20 * 128 and 0 < data["val_bpb"] < 10
    assert data["mfu"] is None and data["tok_per_sec"] > 0 and data["peak_memory_mb"] > 0
    assert section["series"]["train_loss"]["y"][0] == pytest.approx(math.log(300), abs=0.3)
    model, tokenizer, meta = load_model("base", device="cpu")  # default tag: the largest d<N>
    assert meta["step"] == 20 and meta["val_bpb"] == data["val_bpb"]
    assert torch.equal(model.lm_head.weight, weights_a["lm_head.weight"])
    assert tokenizer.vocab_size == model.config.vocab_size == 300


# meta.json's loop_state and plan exactly as nanopipe wrote them before they were typed records (dicts, in this
# key order); a checkpoint of that version must resume as one of this version does
OLD_LOOP_STATE_KEYS = ["smooth_loss", "grad_norm_ema", "train_seconds", "timed_steps", "val_bpb"]
OLD_PLAN_KEYS = ["scaling_params", "target_tokens", "total_batch_size", "grad_accum", "num_iterations", "tokens",
                 "flops_per_token", "total_flops", "lr_scale", "weight_decay"]


def test_a_checkpoint_in_the_old_dict_format_resumes_bitwise(toy_data, capsys):
    flags = ["--data", "toy", "--total-batch-size", "128", "--eval-every", "3", "--eval-tokens", "128",
             "--save-every", "2", "--keep-last", "5", "--num-iterations", "6"]
    assert train_in_process(capsys, *flags, "--model-tag", "whole")[0] == 0
    assert train_in_process(capsys, *flags, "--model-tag", "old")[0] == 0
    old_dir = checkpoint_root("base") / "old"
    for step in (6, 4):  # back to step 2, as the old version left it
        shutil.rmtree(old_dir / f"step_{step:06d}")
    meta_file = old_dir / "step_000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert sorted(meta["loop_state"]) == sorted(OLD_LOOP_STATE_KEYS) and sorted(meta["plan"]) == sorted(OLD_PLAN_KEYS)
    meta["loop_state"] = {key: meta["loop_state"][key] for key in OLD_LOOP_STATE_KEYS}
    meta["plan"] = {key: meta["plan"][key] for key in OLD_PLAN_KEYS}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    assert meta["loop_state"]["smooth_loss"] != 0 and meta["loop_state"]["val_bpb"] is not None

    assert train_in_process(capsys, *flags, "--model-tag", "old", "--resume")[0] == 0
    (step_a, weights_a), (step_b, weights_b) = final_weights("whole"), final_weights("old")
    assert step_a == step_b == 6 and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    volatile = {"dt", "tok_per_sec", "mfu"}
    strip = [{k: v for k, v in r.items() if k not in volatile} for r in read_log("whole")]
    assert [{k: v for k, v in r.items() if k not in volatile} for r in read_log("old")] == strip
    # the resumed loop state carried on from the old dict: the smoothed loss and the val bpb of the uninterrupted run
    resumed = json.loads((old_dir / "step_000006" / "meta.json").read_text())["loop_state"]
    whole = json.loads((checkpoint_root("base") / "whole" / "step_000006" / "meta.json").read_text())["loop_state"]
    assert resumed["smooth_loss"] == whole["smooth_loss"] and resumed["val_bpb"] == whole["val_bpb"]
    assert resumed["grad_norm_ema"] == whole["grad_norm_ema"]


def uniform_length_docs(tokenizer, count, length, seed=0):
    """Documents of exactly `length` tokens after <|bos|>: each fills one row whole, so the packer is FIFO."""
    rng = random.Random(seed)
    docs = []
    while len(docs) < count:
        text = make_doc(rng)
        if len(tokenizer.encode(text)) == length:
            docs.append(text)
    return docs


def test_ddp_two_ranks_match_one_rank_with_grad_accumulation(isolated_dirs, capsys):
    rng = random.Random(1)
    tokenizer = train_tokenizer([make_doc(rng) for _ in range(500)])
    # 2 ranks x 2 micro-batches x 2 rows = one row group of 4 docs per rank per step; 1 rank x 4 micro-batches
    # reads the same two row groups in the same step (row groups alternate between ranks)
    docs = uniform_length_docs(tokenizer, 96, SEQ)
    with shard_writer.ShardWriter(shards.dataset_dir("uniform"), docs_per_shard=40, row_group_size=4) as writer:
        for text in docs:
            writer.write(text)
    # LRs well above the defaults (which the tiny batch scales down by sqrt(256 / 2^19)) so 6 steps visibly learn.
    # No Muon weight decay: the depth rule gives this tiny model lr * wd ~ 0.25 per step, and the cautious mask
    # (decay only where update * weight >= 0) turns a 1e-9 reduction-order difference at a product near 0 into a
    # 25% change of that weight
    flags = ["--data", "uniform", "--num-iterations", "6", "--total-batch-size", str(4 * 2 * SEQ),
             "--eval-every", "-1", "--matrix-lr", "0.5", "--embedding-lr", "5", "--unembedding-lr", "0.2",
             "--weight-decay", "0"]
    assert train_in_process(capsys, *flags, "--model-tag", "single")[0] == 0
    run_train(*flags, "--model-tag", "ddp", nproc=2)
    single = [r for r in read_log("single") if "loss" in r]
    ddp = [r for r in read_log("ddp") if "loss" in r]
    assert len(single) == len(ddp) == 6
    assert single[0]["loss"] == pytest.approx(math.log(300), abs=0.3)
    for a, b in zip(single, ddp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert single[-1]["loss"] < single[0]["loss"] - 0.5  # it trained
    _, weights_single = final_weights("single")
    _, weights_ddp = final_weights("ddp")
    for key in weights_single:
        torch.testing.assert_close(weights_ddp[key], weights_single[key], atol=1e-3, rtol=1e-3)


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(toy_data, capsys):
    code, _, err = train_in_process(capsys, "--data", "toy", "--num-iterations", "10", "--total-batch-size", "64",
                                    "--eval-every", "-1", "--save-every", "1", "--matrix-lr", "1e30",
                                    "--model-tag", "boom")
    assert code == 2
    error = [line for line in err.splitlines() if line.startswith("error:")][-1]
    assert error.startswith("error: training diverged at step 2"), error
    assert "step_000001" in error and "--resume" in error
    assert list_steps(checkpoint_root("base") / "boom") == [1]


def test_resume_refuses_a_different_batch_and_fresh_start_refuses_to_overwrite(toy_data, capsys):
    flags = ["--data", "toy", "--num-iterations", "2", "--eval-every", "-1"]
    assert train_in_process(capsys, *flags, "--total-batch-size", "64")[0] == 0
    code, _, err = train_in_process(capsys, *flags, "--total-batch-size", "64")
    assert code == 2 and "--resume" in err
    code, _, err = train_in_process(capsys, *flags, "--total-batch-size", "128", "--resume")
    assert code == 2 and "--total-batch-size" in err


def test_plan_matches_reference_worked_values():
    # upstream's worked numbers at its default ratio 12 (UPSTREAM_RECIPE.md §4.4): d12 2,520 steps of 2^19, wd 0.28
    args = Namespace(target_param_data_ratio=12, total_batch_size=-1, device_batch_size=32, num_iterations=-1,
                     target_flops=-1, weight_decay=0.28)
    d12 = make_plan(args, config_from_depth(12, 32768, 2048), world_size=1)
    assert (d12.total_batch_size, d12.num_iterations, d12.grad_accum) == (524288, 2520, 8)
    assert d12.lr_scale == 1.0 and d12.weight_decay == pytest.approx(0.28)
    d20 = make_plan(args, config_from_depth(20, 32768, 2048), world_size=1)
    assert (d20.total_batch_size, d20.num_iterations) == (1048576, 4980)
    # T_epoch: wd 0.28 * sqrt(2) * tokens(d12) / tokens(d20)
    assert d20.lr_scale == pytest.approx(math.sqrt(2))
    assert d20.weight_decay == pytest.approx(0.28 * math.sqrt(2) * 110_100_912 / 435_160_240)
    # the reference run is fixed: at ratio 8 (upstream's d24 speedrun) d24 gets its 5,568 steps of 2^20 and a
    # weight decay that follows its tokens relative to d12 at ratio 12 (upstream: 0.0597, reference at ratio 8)
    args.target_param_data_ratio = 8
    d24 = make_plan(args, config_from_depth(24, 32768, 2048), world_size=1)
    assert (d24.total_batch_size, d24.num_iterations) == (1048576, 5568)
    assert d24.weight_decay == pytest.approx(0.28 * math.sqrt(2) * 12 * 110_100_912 / (8 * 729_810_624))


def test_plan_rejects_a_batch_that_does_not_divide_and_names_the_sizes_that_do():
    args = Namespace(target_param_data_ratio=10.5, total_batch_size=524288, device_batch_size=6, num_iterations=-1,
                     target_flops=-1, weight_decay=0.2)
    with pytest.raises(UserError) as e:
        make_plan(args, config_from_depth(12, 32768, 512), world_size=1)
    message = str(e.value)
    assert "--device-batch-size" in message and "3,072" in message and "[1, 2, 4, 8, 16, 32" in message
    assert "\n" not in message


def test_a_grad_norm_spike_is_found_after_step_10_and_skipped_updates_leave_the_mean_alone():
    loop = PretrainLoopState()
    assert base_train.check_spike(0, 2.0, loop, skip=True) == (False, False) and loop.grad_norm_ema == 2.0
    assert base_train.check_spike(5, 50.0, loop, skip=True) == (False, False)  # too early to call a spike
    assert loop.grad_norm_ema == pytest.approx(0.9 * 2.0 + 0.1 * 50.0)
    mean = loop.grad_norm_ema
    assert base_train.check_spike(11, 6 * mean, loop, skip=True) == (True, True) and loop.grad_norm_ema == mean
    assert base_train.check_spike(12, 6 * mean, loop, skip=False) == (True, False)  # logged, update kept
    assert loop.grad_norm_ema == pytest.approx(0.9 * mean + 0.1 * 6 * mean)
    assert base_train.check_spike(13, 1.0, loop, skip=True) == (False, False)


def test_schedules():
    lrm = [lr_multiplier(it, 100, 0.1, 0.5, 0.0) for it in range(100)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == 1.0 and lrm[50] == 1.0
    assert lrm[51] == pytest.approx(49 / 50) and lrm[99] == pytest.approx(1 / 50)
    assert lr_multiplier(99, 100, 0.0, 0.5, 0.1) == pytest.approx(0.02 + 0.98 * 0.1)
    # Muon momentum over 1,000 steps with warmdown 0.65: 0.85 -> 0.97 over 160 steps, hold until step 350,
    # then down to 0.90 at the end
    m = [muon_momentum(it, 1000, 0.65) for it in range(1000)]
    assert m[0] == 0.85 and m[80] == pytest.approx(0.91) and m[160] == m[350] == 0.97
    assert m[675] == pytest.approx(0.935) and m[999] == pytest.approx(0.97 - 0.07 * 649 / 650)
    assert muon_momentum(0, 3, 0.65) == 0.85  # a tiny run still has a one-step ramp
    # Muon weight decay: cosine from the plan's value to 0
    wd = [muon_weight_decay(it, 100, 0.28) for it in (0, 50, 100)]
    assert wd == pytest.approx([0.28, 0.14, 0.0])


def test_dry_run_prints_the_plan_and_writes_nothing(toy_data, capsys):
    code, out, _ = train_in_process(capsys, "--data", "toy", "--num-iterations", "5", "--total-batch-size", "64",
                                    "--dry-run")
    assert code == 0
    assert "parameters:" in out and "5 steps x 64 tokens" in out and "ETA:" in out and "tok/s" in out
    assert not (get_base_dir() / "checkpoints").exists()
    assert not os.path.exists(toy_data.parent / "report" / "sections")


def oom_at_first_forward():
    """A global forward pre-hook that raises torch.OutOfMemoryError at the first forward of any module (the real
    first step's), as CUDA's allocator does, then removes itself."""
    def hook(module, inputs):
        handle.remove()
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return handle


def test_out_of_memory_in_the_first_step_names_a_batch_that_fits_and_writes_nothing(toy_data, capsys):
    # 8 rows run out; 4 is predicted not to fit the --gpu-memory-gb given, 2 is: the line names 2
    config = config_from_depth(2, 300, SEQ, 32, 32)
    peak2, peak4 = (p["peak_bytes"] for p in predict_peaks(asdict(config), "cpu", "float32", False, [(2, 4), (4, 2)]))
    assert peak2 < peak4
    gpu_gb = (peak2 + peak4) / 2 / FITS_FRACTION / GIB
    flags = ["--data", "toy", "--num-iterations", "3", "--total-batch-size", "256", "--device-batch-size", "8",
             "--eval-every", "-1", "--model-tag", "oom"]
    for extra, named in ((["--gpu-memory-gb", f"{gpu_gb:.9f}"], "--device-batch-size 2 "),
                         ([], "--device-batch-size 4 or less")):  # no GPU to size for: the next smaller divisor
        handle = oom_at_first_forward()
        try:
            code, out, err = train_in_process(capsys, *flags, *extra)
        finally:
            handle.remove()
        assert code == 2, err[-2000:]
        errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "out of memory in the first step with --device-batch-size 8" in errors[0], errors
        assert named in errors[0], errors[0]
        assert ("--gpu-memory-gb" in errors[0]) and "Traceback" not in err
        assert not list_steps(checkpoint_root("base") / "oom")
        assert not os.path.exists(toy_data.parent / "report" / "sections")


def test_checkpoint_roundtrip_keep_last_and_incomplete_folders(isolated_dirs):
    torch.manual_seed(0)
    model = build_model(config_from_depth(2, 300, max_seq_len=16, aspect_ratio=32, head_dim=32), "cpu")
    optimizers = setup_optimizers(model)
    x = torch.randint(0, 300, (2, 16))
    ckpt_dir = checkpoint_root("base") / "t"
    for step in (1, 2, 3):
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        save_checkpoint(ckpt_dir, step, model, optimizers, {"note": step}, loader_state={"pos": step}, keep_last=2)
    assert list_steps(ckpt_dir) == [2, 3]
    (ckpt_dir / ".step_000004.tmp").mkdir()  # a save killed halfway
    assert find_last_step(ckpt_dir) == 3
    (ckpt_dir / "step_000005").mkdir()  # a folder without meta.json / model.safetensors: damage, not a fallback
    assert find_last_step(ckpt_dir) == 5
    with pytest.raises(UserError, match=r"step_000005/meta.json .*delete .*step_000005 to fall back to step 3"):
        load_checkpoint(ckpt_dir)
    (ckpt_dir / "step_000005").rmdir()
    state = rng_state()
    expected = torch.rand(3)
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt["step"] == 3 and ckpt["meta"]["note"] == 3 and ckpt["loader"] == {"pos": 3}
    assert ckpt["meta"]["model_config"]["vocab_size"] == 300
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    fresh = setup_optimizers(model)
    for opt, saved in zip(fresh, ckpt["optimizers"]):
        opt.load_state_dict(saved)
    assert fresh[1].state_dict()["state"].keys() == optimizers[1].state_dict()["state"].keys()
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)


def test_clean_state_dict_strips_compile_and_ddp_prefixes():
    assert list(clean_state_dict({"_orig_mod.module.lm_head.weight": 1, "module.x": 2, "y": 3})) == \
        ["lm_head.weight", "x", "y"]


def test_load_model_without_checkpoints_says_what_to_run(isolated_dirs):
    with pytest.raises(UserError, match="python -m scripts.base_train"):
        load_model("base")
    with pytest.raises(UserError, match="python -m scripts.chat_sft"):
        load_model("sft")


def test_a_log_file_gets_one_readable_line_per_step(toy_data, tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:  # as `> log 2>&1` does: stdout is a file, not a terminal
        result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--data", "toy",
                                 "--num-iterations", "20", "--total-batch-size", "128", "--eval-every", "10",
                                 "--eval-tokens", "128"], env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                timeout=180)
    assert result.returncode == 0, log.read_text()[-3000:]
    text = log.read_bytes().decode("utf-8")  # read_text() would turn a bar's \r into \n
    steps = re.findall(r"^step (\d{5})/00020 \(([\d.]+)%\) \| loss [\d.]+ \| lr [\d.]+ \| dt \d+ms \| "
                       r"tok/s [\d,]+ \| eta \w+$", text, flags=re.M)
    assert [int(s) for s, _ in steps] == list(range(1, 21)), text[-2000:]
    assert float(steps[9][1]) == 50.0
    assert re.search(r"^step 10: val bpb [\d.]+$", text, flags=re.M)
    assert "\r" not in text  # no progress bar redraws in a file
