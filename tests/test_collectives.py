"""Every collective of every stage gets a tensor NCCL accepts: the four torchrun stages run on 2 CPU ranks under
tests/collective_guard.py, which refuses host tensors as NCCL does (gloo alone takes anything)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanopipe import shards
from nanopipe.common import get_base_dir
from nanopipe.tokenizer import Tokenizer
from tasks.world.source import build_synthetic
from tests.collective_guard import checked_collectives, is_host
from tests.conftest import subprocess_env


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_guard_refuses_host_tensors_and_follows_them_through_ops(single_rank_group):
    with checked_collectives():
        host = torch.tensor([1.0, 2.0])
        device = torch.zeros(2, device="cpu")
        assert is_host(host) and is_host(host * 2) and is_host(host.double())
        assert not is_host(device) and not is_host(device + host) and not is_host(host.to("cpu"))
        assert is_host(device.cpu()) and is_host(host.to(torch.float64))
        assert is_host(torch.from_numpy(host.numpy()))
        dist.all_reduce(device)
        dist.all_reduce(host.to("cpu"))
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu: dist.all_reduce at "
                                               "tests/test_collectives.py"):
            dist.all_reduce(host)
        with pytest.raises(RuntimeError, match="dist.all_gather at"):
            dist.all_gather([torch.zeros(2, device="cpu")], host + 1)
    assert dist.all_reduce.__module__ == "torch.distributed.distributed_c10d"  # unpatched after the block


def guarded(log_dir, module, *flags, timeout=300):
    """`module` under torchrun on 2 CPU ranks with its collectives checked; the sites of the calls it made."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.collective_guard", str(log_dir), module, *flags, "--device", "cpu"]
    result = subprocess.run(cmd, env=subprocess_env(NANOPIPE_DATA="synthetic"), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for rank in (0, 1) for line in (log_dir / f"rank{rank}.jsonl").read_text().splitlines()]
    assert all(c["ok"] for c in calls)
    return {c["site"].rsplit(":", 1)[0] for c in calls}


def test_every_stage_hands_nccl_device_tensors(isolated_dirs, tmp_path):
    build_synthetic(num_shards=2)
    docs = (text for text, _ in shards.iter_documents("synthetic", "train"))
    Tokenizer.train(docs, vocab_size=512).save(get_base_dir() / "tokenizer")
    sites = guarded(tmp_path / "base_train", "scripts.base_train", "--depth", "2", "--aspect-ratio", "32",
                    "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2", "--total-batch-size", "512",
                    "--num-iterations", "2", "--eval-every", "2", "--eval-tokens", "256", "--core-metric-every", "2",
                    "--max-per-task", "4", "--sample-every", "2", "--model-tag", "d2")
    assert {"nanopipe/loss_eval.py", "nanopipe/core_eval.py"} <= sites and len(sites) >= 3  # + the train loss
    sites = guarded(tmp_path / "base_eval", "scripts.base_eval", "--max-per-task", "4", "--device-batch-size", "4",
                    "--eval-tokens", "256", "--eval", "core,bpb,sample")
    assert {"nanopipe/loss_eval.py", "nanopipe/core_eval.py"} <= sites
    # epochs, not --num-iterations: the epoch count is agreed over ranks (a collective of its own)
    sites = guarded(tmp_path / "chat_sft", "scripts.chat_sft", "--device-batch-size", "4", "--num-epochs", "0.01",
                    "--val-conversations", "16", "--eval-every", "1")
    assert sites
    sites = guarded(tmp_path / "chat_eval", "scripts.chat_eval", "-i", "sft", "--max-per-task", "4",
                    "--max-new-tokens", "8", "--tool-ablation")
    assert "nanopipe/chat_eval.py" in sites
