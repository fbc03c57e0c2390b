import contextlib
import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from nanopipe import shards
from nanopipe.common import get_base_dir
from nanopipe.gpt import GPTConfig, build_model, config_from_depth
from nanopipe.tokenizer import Tokenizer
from tasks.world.documents import generate_documents
from tasks.world.source import build_synthetic

# The tests' models are tiny: one thread avoids the threading overhead that dominates small matmuls (and
# keeps timings steady when the machine is busy). Subprocesses get the same through OMP_NUM_THREADS=1.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own base dir and report dir, so nothing touches ~/.cache or the repo's report/."""
    base = tmp_path / "base"
    report = tmp_path / "report"
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(base))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(report))
    for var in ("NANOPIPE_DEVICE", "NANOPIPE_DTYPE", "NANOPIPE_DATA", "NANOPIPE_DEBUG", "NANOPIPE_EVAL_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    return base


@pytest.fixture
def shared_data():
    """../shared/data when this checkout has it (developer machines, CI); tests that need it skip otherwise."""
    path = SHARED / "data"
    if not path.exists():
        pytest.skip("../shared/data is not present")
    return path


def subprocess_env(**extra):
    """Environment for a child python process: the test's dirs, CPU, and the repo on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def tokenizer():
    """A real BPE tokenizer, small (vocab 400), trained on the synthetic world's first documents."""
    return Tokenizer.train(iter(list(generate_documents(0, 200))), vocab_size=400)


def tiny_gpt(vocab=300, depth=2, seq_len=32, seed=0):
    """A freshly initialised GPT sized from depth as base_train sizes it, at width 32 per layer (depth 2: 64)."""
    torch.manual_seed(seed)
    return build_model(config_from_depth(depth, vocab, max_seq_len=seq_len, aspect_ratio=32, head_dim=32), "cpu")


def noisy_gpt(tokenizer, seq_len, n_layer=2, noise=0.2, seed=0):
    """A width-64, 2-head GPT for `tokenizer` in eval mode, its weights shifted by noise * N(0, 1): a fresh init
    zeroes the output projections, which would make attention a no-op (noise=0 keeps that init)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=seq_len, vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2,
                       n_embd=64)
    model = build_model(config, "cpu")
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """torch at one thread inside, as the subprocesses run (a test may have changed it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def synthetic_world(base, report_dir=None):
    """Inside: `base` is the base dir (reports in `report_dir`, default base/report, and NANOPIPE_DATA=synthetic)
    and holds the synthetic world (2 shards) and a 512-token tokenizer trained on its train split; one thread."""
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("NANOPIPE_BASE_DIR", str(base))
        mp.setenv("NANOPIPE_REPORT_DIR", str(report_dir or base / "report"))
        mp.setenv("NANOPIPE_DATA", "synthetic")
        build_synthetic(num_shards=2)
        docs = (text for text, _ in shards.iter_documents("synthetic", "train"))
        Tokenizer.train(docs, vocab_size=512).save(get_base_dir() / "tokenizer")
        yield


@pytest.fixture(scope="session")
def chat_world(tmp_path_factory):
    """A base dir with a tiny trained pipeline: the synthetic world (2 shards), a 512-token tokenizer, 8 steps of
    pretraining (tag d2) and 4 of SFT, quick evals of both, and their report sections. Read-only for its tests."""
    from scripts import base_eval, base_train, chat_eval, chat_sft
    base = tmp_path_factory.mktemp("chat_world")
    with synthetic_world(base):
        base_train.main(["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "128",
                         "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "8",
                         "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1",
                         "--device", "cpu", "--model-tag", "d2"])
        chat_sft.main(["--device-batch-size", "4", "--val-conversations", "24", "--eval-every", "1000",
                       "--device", "cpu", "--num-iterations", "4"])
        base_eval.main(["--eval", "core,bpb", "--max-per-task", "4", "--eval-tokens", "4096", "--device", "cpu"])
        chat_eval.main(["-i", "sft", "--max-per-task", "4", "--max-new-tokens", "8", "--device", "cpu"])
    return base


# base_train flags of the `trained` fixture's run: 2 steps of a depth-2 model, a checkpoint after each
TINY_RUN = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--device-batch-size",
            "2", "--total-batch-size", "64", "--num-iterations", "2", "--save-every", "1", "--eval-every", "-1",
            "--core-metric-every", "-1", "--sample-every", "-1", "--device", "cpu", "--data", "toy",
            "--model-tag", "d2"]


def run_main(main, argv, capsys):
    """A stage's main() in this process, at one thread as the subprocesses run: (exit code, stderr)."""
    code = 0
    with one_thread():
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir with data/toy, a 300-token tokenizer and checkpoints/base/d2/step_00000{1,2} (TINY_RUN)."""
    from nanopipe import shard_writer
    from scripts import base_train
    base = tmp_path_factory.mktemp("trained") / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOPIPE_BASE_DIR", str(base))
        mp.setenv("NANOPIPE_REPORT_DIR", str(base.parent / "report"))
        rng = random.Random(0)
        words = "the a river stone cloud seven green quick brown fox jumps over lazy dog city".split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(600)]
        with shard_writer.ShardWriter(shards.dataset_dir("toy"), docs_per_shard=250, row_group_size=50) as writer:
            for text in docs:
                writer.write(text)
        Tokenizer.train(iter(docs), vocab_size=300).save(base / "tokenizer")
        with one_thread():
            base_train.main(TINY_RUN)
    return base


def snapshot(*roots):
    """Every file and folder under the roots: path -> sha256 of the file ("dir" for a folder)."""
    state = {}
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            state[dirpath] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    state[path] = hashlib.sha256(f.read()).hexdigest()
    return state
