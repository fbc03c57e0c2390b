"""The CUDA path on fake CUDA tensors (no GPU needed): bf16 dtype flow, no (B*T, V) logits, the engine's bf16 KV
cache, and base_train --dry-run's traced peak memory. Each runs in a child process that loads the fake-CUDA
shim before torch (nanopipe.fake_cuda)."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanopipe.common import UserError
from nanopipe.fake_cuda import SHIM_ENV, build_shim
from nanopipe.gpt import config_from_depth
from nanopipe.memory import GIB, predict_peaks
from nanopipe.train_step import training_dtype
from tests.conftest import subprocess_env


def run_fake_cuda(code: str, timeout=300) -> dict:
    """Run `code` (which prints one JSON line last) in a child with fake CUDA; return that JSON."""
    prelude = "from nanopipe.fake_cuda import bootstrap\nbootstrap()\n"
    env = subprocess_env(**{SHIM_ENV: build_shim()})
    result = subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


TRACE = """
import json, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from nanopipe.gpt import GPTConfig, KVCache
from nanopipe.memory import ForcedAutocast, fake_model, use_flash_attention

use_flash_attention()  # as on a real Ampere+ GPU (a fake one cannot answer SDPA's kernel choice)

B, T, V = 4, 256, 4096
config = GPTConfig(sequence_len=T, vocab_size=V, n_layer=3, n_head=2, n_kv_head=2, n_embd=128)
sdpa_inputs, big, saved, copies = [], [], [], []

class Watch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            sdpa_inputs.append([str(a.dtype) for a in args[:3]])
        if "_to_copy" in name:
            copies.append([list(args[0].shape), str(args[0].dtype), str(out.dtype)])
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor) and o.numel() >= B * T * V:
                big.append([name, list(o.shape), str(o.dtype)])
        return out

def pack(t):
    saved.append([list(t.shape), str(t.dtype), t.numel()])
    return t

result = {}
with FakeTensorMode(allow_non_fake_inputs=True):
    model = fake_model(config, "cuda")
    x = torch.zeros((B, T), dtype=torch.long, device="cuda")
    with ForcedAutocast("cuda", torch.bfloat16), Watch(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)
    with Watch():
        loss.backward()
    result["train"] = {"sdpa": sdpa_inputs, "big": big, "saved": saved, "loss_dtype": str(loss.dtype),
                       "weight_dtype": str(model.lm_head.weight.dtype),
                       "grad_dtype": str(model.lm_head.weight.grad.dtype)}
    sdpa_inputs.clear(); copies.clear()
    # the engine's decode step: a bf16 cache (the engine's choice under autocast), one new token
    cache = KVCache(2, 64, config, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), ForcedAutocast("cuda", torch.bfloat16):
        model(torch.zeros((2, 8), dtype=torch.long, device="cuda"), kv_cache=cache)
        with Watch():
            logits = model(torch.zeros((2, 1), dtype=torch.long, device="cuda"), kv_cache=cache)
    result["decode"] = {"sdpa": sdpa_inputs, "copies": copies, "cache_dtype": str(cache.k.dtype)}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def fake_trace():
    return run_fake_cuda(TRACE)


def test_sdpa_gets_bf16_and_no_fp32_logits_are_saved_or_made(fake_trace):
    train = fake_trace["train"]
    assert len(train["sdpa"]) == 3  # one per layer
    assert all(dtypes == ["torch.bfloat16"] * 3 for dtypes in train["sdpa"]), train["sdpa"]
    B, T, V = 4, 256, 4096
    # nothing of (B*T, V) size exists at any point of forward or backward: the head works a chunk at a time
    assert train["big"] == []
    assert not [s for s in train["saved"] if s[2] >= B * T * V]
    # the residual stream, q/k/v and the MLP are bf16: no activation of (B, T, C) size or more is saved in fp32
    # (the fp32 ones left are per-row statistics, the fp32 weights' gradient of the head, and index tensors)
    activations = [s for s in train["saved"] if s[2] >= B * T * 128 and s[1] != "torch.int64"]
    assert activations and all(s[1] == "torch.bfloat16" for s in activations if s[0] != [4096, 128]), activations
    # fp32 master weights and fp32 gradients; the loss in fp32
    assert train["weight_dtype"] == train["grad_dtype"] == train["loss_dtype"] == "torch.float32"


def test_decode_reads_the_bf16_cache_without_upcasting_it(fake_trace):
    decode = fake_trace["decode"]
    assert decode["cache_dtype"] == "torch.bfloat16"
    assert decode["sdpa"] and all(d == ["torch.bfloat16"] * 3 for d in decode["sdpa"])
    # no dtype copy of the cached keys/values (2 rows, 2 heads, >= 9 positions, 64) per decoded token: only the new
    # token's own activations and its logits are cast
    assert not [c for c in decode["copies"] if len(c[0]) == 4 and c[0][2] >= 9], decode["copies"]
    assert any(c[0] == [2, 1, 4096] for c in decode["copies"])  # the watch does see casts


def test_predicted_peak_grows_with_the_batch_and_covers_the_static_memory():
    config = config_from_depth(2, 4096, 256, aspect_ratio=64, head_dim=64)
    b2, b4, b8 = predict_peaks(asdict(config), "cuda", "bfloat16", False, [(2, 2), (4, 2), (8, 2)])
    static = sum(b2["parts"][k] for k in ("parameters", "gradients", "optimizer_state"))
    assert b2["peak_bytes"] > static > 0
    assert b2["parts"]["optimizer_state"] > b2["parts"]["parameters"]  # AdamW: two moments
    # the activations are linear in the rows: 4 more rows add twice what 2 more rows add
    assert (b8["peak_bytes"] - b4["peak_bytes"]) / (b4["peak_bytes"] - b2["peak_bytes"]) == pytest.approx(2, rel=0.2)


def dry_run_json(*flags, env=None, timeout=900):
    cmd = [sys.executable, "-m", "scripts.base_train", "--dry-run", "--json", "--device", "cuda", *flags]
    return subprocess.run(cmd, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


TINY = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "256",
        "--total-batch-size", "8192"]


def test_dry_run_on_fake_cuda_prints_one_json_plan(isolated_dirs):
    result = dry_run_json(*TINY, "--device-batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    plan = json.loads(lines[0])
    assert plan["peak_memory_source"] == "predicted" and plan["fake_device"] is True
    assert plan["device_batch_size"] == 8 and plan["grad_accum"] == 4 and plan["dtype"] == "bfloat16"
    assert plan["tokens_per_second"] is None and plan["mfu"] is None
    assert 0 < plan["peak_memory_gb"] == plan["predicted_peak_memory_gb"] < 4
    assert "predicted peak GPU memory" in result.stderr
    assert not (isolated_dirs / "checkpoints").exists()


def test_auto_batch_picks_the_largest_that_fits_and_a_batch_too_big_is_refused(isolated_dirs):
    config = config_from_depth(2, 32768, 256, aspect_ratio=64, head_dim=64)
    sizes = [1, 2, 4, 8, 16, 32]  # the divisors of 8192 / 256
    traces = {b: p["peak_bytes"] for b, p in zip(sizes, predict_peaks(
        asdict(config), "cuda", "bfloat16", False, [(b, 32 // b) for b in sizes]))}
    # a GPU on which exactly 8 rows fit (by the same 90% rule)
    gpu_gb = (traces[8] + traces[16]) / 2 / 0.9 / GIB
    result = dry_run_json(*TINY, "--device-batch-size", "auto", "--gpu-memory-gb", f"{gpu_gb:.4f}")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["device_batch_size"] == 8 and plan["grad_accum"] == 4
    assert plan["predicted_peak_memory_gb"] == pytest.approx(traces[8] / GIB)

    result = dry_run_json(*TINY, "--device-batch-size", "32", "--gpu-memory-gb", f"{gpu_gb:.4f}")
    assert result.returncode == 2 and result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --device-batch-size 32 needs") and "use --device-batch-size 8" in error
    assert not (isolated_dirs / "checkpoints").exists()


@pytest.mark.slow
def test_d12_compiled_prediction_matches_the_measured_reference():
    """The reference fork measured 31.5 GB peak for d12, seq 1024, device batch 64, bf16, compiled."""
    result = dry_run_json("--depth", "12", "--max-seq-len", "1024", "--device-batch-size", "64", "--compile",
                          timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["grad_accum"] == 8 and plan["compile"] is True
    assert 0.8 * 31.5 <= plan["peak_memory_gb"] <= 1.2 * 31.5, plan["peak_memory_gb"]


def test_fp16_and_a_gpu_without_bf16_are_refused_in_one_line(monkeypatch):
    with pytest.raises(UserError, match="NANOPIPE_DTYPE=float32") as e:
        training_dtype("cuda", bf16_supported=False, requested="")
    assert "\n" not in str(e.value)
    assert training_dtype("cuda", bf16_supported=True, requested="") == torch.bfloat16
    assert training_dtype("cuda", bf16_supported=False, requested="float32") == torch.float32
    monkeypatch.setenv("NANOPIPE_DTYPE", "float16")
    with pytest.raises(UserError, match="float16 is not supported"):
        training_dtype("cpu")
