"""The data profile: one place decides, from the dataset name, the CORE bundle, SFT mixture, chat-eval tasks and
sample prompts, and every stage (base_train included) asks it."""

import os
from pathlib import Path

import pytest
import torch

from nanopipe.common import UserError, get_base_dir
from nanopipe.shards import iter_documents
from nanopipe.tokenizer import Tokenizer
from scripts import base_train, chat_eval
from tasks.profile import REAL_SAMPLE_PROMPTS, data_profile
from tasks.registry import EVAL_SETS, SFT_MIXTURES
from tasks.world.facts import sample_prompts
from tasks.world.source import build_synthetic


def test_synthetic_and_real_profiles(isolated_dirs, monkeypatch):
    world = data_profile("synthetic")
    assert (world.kind, world.sft_mixture, world.eval_tasks) == ("synthetic", "synthetic", EVAL_SETS["synthetic"])
    for name in ("fineweb-edu", "climbmix", "mine"):  # downloads and local files are real text
        real = data_profile(name)
        assert (real.kind, real.sft_mixture, real.eval_tasks) == ("real", SFT_MIXTURES["real"], EVAL_SETS["real"])
        assert real.sample_prompts() == REAL_SAMPLE_PROMPTS
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    assert data_profile().kind == "synthetic" and data_profile("mine").kind == "real"  # the flag wins
    assert chat_eval.task_names("all") == EVAL_SETS["synthetic"] != EVAL_SETS["real"]
    assert chat_eval.task_names("all", "fineweb-edu") == EVAL_SETS["real"]


def test_eval_bundle_follows_the_profile(isolated_dirs, monkeypatch):
    with pytest.raises(UserError, match="scripts.dataset synthetic"):
        data_profile("synthetic").eval_bundle_dir()
    with pytest.raises(UserError, match="scripts.dataset eval-bundle"):
        data_profile("mine").eval_bundle_dir()
    build_synthetic(num_shards=2)
    assert data_profile("synthetic").eval_bundle_dir() == get_base_dir() / "data" / "synthetic" / "eval_bundle"
    monkeypatch.setenv("NANOPIPE_EVAL_BUNDLE", str(get_base_dir() / "data" / "synthetic" / "eval_bundle"))
    assert data_profile("mine").eval_bundle_dir() == get_base_dir() / "data" / "synthetic" / "eval_bundle"


def test_world_prompts_are_about_the_world_the_dataset_was_built_from(isolated_dirs):
    build_synthetic(num_shards=2, seed=3)
    prompts = data_profile("synthetic").sample_prompts()
    assert prompts == sample_prompts(3) and prompts != sample_prompts(0)
    assert not set(prompts) & set(REAL_SAMPLE_PROMPTS)


def test_base_train_samples_the_world_on_synthetic_data(isolated_dirs):
    """base_train once sampled "The capital of France" on the synthetic world: its samples now start with the
    world's own prompts, as base_eval's do."""
    build_synthetic(num_shards=2)
    Tokenizer.train((t for t, _ in iter_documents("synthetic", "train")), vocab_size=300).save(
        get_base_dir() / "tokenizer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base_train.main(["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
                         "--device-batch-size", "2", "--total-batch-size", "64", "--num-iterations", "1",
                         "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "1", "--device", "cpu",
                         "--data", "synthetic", "--model-tag", "d2"])
    finally:
        torch.set_num_threads(threads)
    section = next((Path(os.environ["NANOPIPE_REPORT_DIR"]) / "sections").glob("*base_train.md")).read_text()
    samples = section.split("Samples (greedy):")[1].strip().splitlines()
    assert len(samples) == len(sample_prompts(0))
    assert all(line.strip().startswith(repr(prompt)[:-1]) for line, prompt in zip(samples, sample_prompts(0)))
    assert "France" not in section
