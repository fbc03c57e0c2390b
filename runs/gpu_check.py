"""The Python parts of runs/gpu_check.sh: each prints one `| part | result |` table row (or several), exit 0 when
it passed. The device is CUDA unless GPU_CHECK_DEVICE=cpu (the smoke mode: tiny sizes, gloo for NCCL).

    python runs/gpu_check.py versions|sdpa|collectives|engine|syncs
    python -m scripts.base_train ... --dry-run --json | python runs/gpu_check.py dry_run LABEL
"""

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMOKE = DEVICE == "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def row(part: str, result: str):
    print(f"| {part} | {result} |", flush=True)


def versions():
    row("torch", f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if DEVICE == "cuda":
        row("GPU", f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    try:
        import triton
        row("Triton", triton.__version__)
    except ImportError as e:
        row("Triton", f"not importable ({e}): `bash runs/setup.sh` installs it")
    ptxas = os.environ.get("TRITON_PTXAS_BLACKWELL_PATH") or os.environ.get("TRITON_PTXAS_PATH")
    row("ptxas", ptxas or "Triton's bundled one")


def sdpa():
    """The kernel SDPA really runs for the model's attention (bf16, causal, head dim 128), from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    B, H, T, D = (2, 2, 64, 64) if SMOKE else (8, 6, 1024, 128)
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    names = {e.key for e in prof.key_averages()}
    chosen = sorted(n.removeprefix("aten::") for n in names
                    if n.startswith("aten::_scaled_dot_product_") or n.startswith("aten::_flash_attention"))
    row("SDPA backend", f"{', '.join(chosen) or 'unknown'} ({str(DTYPE).removeprefix('torch.')}, causal, d {D})")


def collectives():
    """A one-process group on the stages' backend, every collective they call (DDP's too) on device tensors."""
    import torch.distributed as dist

    from nanopipe.common import DistInfo
    from nanopipe.train_step import wrap_model
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if DEVICE == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            done = []
            x = torch.ones(4, device=DEVICE)
            for op in ("SUM", "MIN", "MAX"):
                dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
                done.append(f"all_reduce {op}")
            n = torch.tensor([3], device=DEVICE, dtype=torch.long)
            dist.all_reduce(n)
            done.append("all_reduce long")
            dist.broadcast(x, 0)
            done.append("broadcast")
            dist.barrier()
            done.append("barrier")
            model = torch.nn.Linear(8, 8).to(DEVICE)
            ddp = wrap_model(model, DistInfo(0, 0, 1, True), DEVICE, False)
            ddp(torch.randn(2, 8, device=DEVICE)).sum().backward()
            done.append("DDP backward")
        finally:
            dist.destroy_process_group()
    row(f"collectives ({backend})", "ok: " + ", ".join(done))


def tiny_model():
    from nanopipe.gpt import build_model, config_from_depth
    torch.manual_seed(0)
    config = config_from_depth(2, 512, 64, aspect_ratio=32, head_dim=32) if SMOKE else \
        config_from_depth(12, 32768, 1024)
    return build_model(config, DEVICE), config


def engine():
    """Decoding with the KV cache gives the logits of the full forward (bf16 on a GPU)."""
    from nanopipe.common import autocast
    from nanopipe.gpt import KVCache
    model, config = tiny_model()
    model.eval()
    T = 16 if SMOKE else 64
    ids = torch.randint(0, config.vocab_size, (1, T), device=DEVICE)
    with torch.no_grad(), autocast(DEVICE, DTYPE):
        full = model(ids).float()
        cache = KVCache(1, T, config, device=DEVICE, dtype=DTYPE)
        steps = [model(ids[:, :T // 2], kv_cache=cache)[:, -T // 2:]]
        for t in range(T // 2, T):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache))
        cached = torch.cat(steps, dim=1).float()
    err = (cached - full).abs().max().item()
    scale = full.abs().max().item()
    ok = err <= 0.05 * scale
    row("engine cache vs no cache", f"{'ok' if ok else 'FAILED'}: max |diff| {err:.3g} (logits up to {scale:.3g}, "
        f"{str(DTYPE).removeprefix('torch.')}, {T} tokens)")
    if not ok:
        sys.exit(1)


def syncs():
    """Host syncs per training step (cudaStreamSynchronize / item / to-CPU copies seen by the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from nanopipe.common import autocast
    from nanopipe.optim import setup_optimizers
    from nanopipe.train_step import TrainStep
    model, config = tiny_model()
    optimizers = setup_optimizers(model)
    B = 2 if SMOKE else 16
    step = TrainStep(model, model, optimizers, 2, autocast(DEVICE, DTYPE), 1.0, False, 1)
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len), device=DEVICE)
    step.accumulate([(x, x)] * 2)
    step.update()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    n_steps = 3
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step.accumulate([(x, x)] * 2)
            step.update()
    counts = {}
    for e in prof.key_averages():
        for key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense"):
            if e.key == key:
                counts[key] = e.count / n_steps
    row("host syncs per step", ", ".join(f"{k} {v:g}" for k, v in counts.items()) or "none seen")


def dry_run():
    """One row from base_train --dry-run --json on stdin (its last line); argv[2] labels it."""
    import json
    p = json.loads(sys.stdin.read().strip().splitlines()[-1])

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    row(f"base_train --dry-run {sys.argv[2]}",
        f"{fmt(p['tokens_per_second'], ',.0f')} tok/s, "
        f"MFU {fmt(p['mfu'], '.1f')}{'' if p['mfu'] is None else '%'}, peak "
        f"{fmt(p['measured_peak_memory_gb'], '.2f')} GB measured vs {fmt(p['predicted_peak_memory_gb'], '.2f')} GB "
        f"predicted (batch {p['device_batch_size']} x accum {p['grad_accum']})")


if __name__ == "__main__":
    parts = {"versions": versions, "sdpa": sdpa, "collectives": collectives, "engine": engine, "syncs": syncs,
             "dry_run": dry_run}
    parts[sys.argv[1]]()
