"""Can torch.compile build kernels on this machine? A few seconds (a minute when the caches are cold) of the same
kind of code training compiles: a matmul, an RMS norm and a pointwise tail under bf16 autocast on CUDA, through
inductor (Triton and ptxas on a GPU, the C++ compiler on CPU), checked against eager.

    python runs/compile_probe.py      # prints one line; exit 0 when it compiles, 1 (the cause in the line) when not

The speedrun scripts run it to decide COMPILE; runs/gpu_check.sh reports it.
"""

import os
import sys


def probe() -> str:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ptxas = os.environ.get("TRITON_PTXAS_BLACKWELL_PATH") or os.environ.get("TRITON_PTXAS_PATH") or "Triton's own"
    where = f"C++ kernels; Triton's ptxas would be {ptxas}"
    if device == "cuda":
        import triton  # an ImportError names the missing module: runs/setup.sh installs it
        where = f"{torch.cuda.get_device_name()}, Triton {triton.__version__}, ptxas {ptxas}"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def block(x, w):
        h = torch.nn.functional.rms_norm(x @ w, (w.shape[1],))
        return torch.relu(h).square().sum(dim=-1)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=gen).to(device)
    w = torch.randn(64, 64, generator=gen).to(device)
    with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        want = block(x, w)
        got = torch.compile(block, fullgraph=True, dynamic=False)(x, w)
    error = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
    if error > 0.05:
        raise RuntimeError(f"compiled output differs from eager by {error:.2%}")
    return f"compile probe: ok on {device} ({where})"


def main():
    try:
        print(probe())
    except Exception as e:  # noqa: BLE001 - any failure means "does not compile here", reported in one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[0][:300] if lines else "no message"
        print(f"compile probe: failed: {type(e).__name__}: {cause}")
        sys.exit(1)


if __name__ == "__main__":
    main()
