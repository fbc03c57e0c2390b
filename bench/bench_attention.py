"""Sliding-window attention on this machine: is there a fast path? Full causal SDPA vs windowed variants.

Times forward + backward of one attention call at a training shape, each variant against full causal
attention (SDPA `is_causal`, the path nanopipe uses) measured in the same run:
1. SDPA with a dense boolean window mask (what upstream nanochat does without FA3);
2. FlexAttention with a sliding-window block mask (torch.compile'd; skipped with the reason if it fails).
A window only pays if it is faster than full attention: it never improves a token's loss by itself.

    python -m bench.bench_attention                         # d4 shape: batch 16, 4 heads of 64, seq 512
    python -m bench.bench_attention --seq 2048 --heads 6 --head-dim 128 --batch 1 --window 512
"""

import argparse
import time

import torch
import torch.nn.functional as F


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--window", type=int, default=0, help="window (keys before the query; 0: seq/4 rounded up to 128)")
    p.add_argument("--steps", type=int, default=3, help="calls timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    T, window = args.seq, args.window or -(-args.seq // 4 // 128) * 128
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, T, args.head_dim, generator=gen).to(args.device, dtype)
               .requires_grad_() for _ in range(3))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run(attend):
        def step():
            attend(q, k, v).sum().backward()
            sync()
        return step

    pos = torch.arange(T, device=args.device)
    dense = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= window)
    variants = {
        "full causal (is_causal)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        f"window {window}, dense mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki <= window), None, None, T, T,
                                       device=args.device)
        flex = torch.compile(flex_attention, dynamic=False)
        variants[f"window {window}, FlexAttention"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    except Exception as e:  # noqa: BLE001 - any failure just means no flex path here
        print(f"FlexAttention unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    print(f"{args.device}, {dtype}, batch {args.batch}, {args.heads} heads of {args.head_dim}, seq {T}, "
          f"window {window}, threads {torch.get_num_threads()}; forward + backward per call")
    # interleaved rounds, best of each: background load on a shared machine hits every variant alike
    best = {}
    for round_ in range(args.rounds):
        for name, attend in variants.items():
            if best.get(name, 0.0) is None:
                continue
            try:
                seconds = timed(run(attend), warmup=1 if round_ == 0 else 0, steps=args.steps)
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                print(f"{name:32s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                best[name] = None
                continue
            best[name] = min(best.get(name) or seconds, seconds)
    base = best["full causal (is_causal)"]
    for name, seconds in best.items():
        if seconds is not None:
            print(f"{name:32s} {1e3 * seconds:8.1f} ms   {base / seconds:5.2f}x the speed of full causal")

if __name__ == "__main__":
    main()
