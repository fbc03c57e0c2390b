"""Training throughput on CPU: our step (model loss + Muon/AdamW) vs a plain reference loop, same run.

The reference is what nanochat does per step without compile: full (B, T, V) logits, F.cross_entropy on
them, and one torch.optim.AdamW over every parameter. The nanochat issue this shape comes from reports
~1030 tok/s (8 s/step) for it; we print our tok/s, the reference's, and the ratio. `--baseline-tree` adds
our step as another checkout has it (its nanopipe/gpt.py and optim.py), to see what a model or optimizer
change costs.

    python -m bench.bench_train                    # depth 4, seq 512, batch 16x512, vocab 32768, fp32
    python -m bench.bench_train --steps 2 --batch 4  # quicker
    python -m bench.bench_train --baseline-tree /tmp/old   # e.g. git worktree add /tmp/old HEAD~1
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanopipe.gpt import build_model, config_from_depth
from nanopipe.optim import setup_optimizers


def time_steps(step_fn, warmup: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step. On a shared machine the CPU time is the steadier
    figure: with --threads 1 it is what a step would take on an idle core."""
    for _ in range(warmup):
        step_fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def load_tree_modules(tree: Path):
    """(gpt, optim) modules of another checkout, loaded under private names (they import only torch)."""
    modules = []
    for name in ("gpt", "optim"):
        path = tree / "nanopipe" / f"{name}.py"
        if not path.exists():
            sys.exit(f"error: --baseline-tree {tree} has no nanopipe/{name}.py: pass a nanopipe checkout")
        spec = importlib.util.spec_from_file_location(f"_baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="also time this checkout's step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = config_from_depth(args.depth, args.vocab, max_seq_len=args.seq, head_dim=args.head_dim)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    x, y = batch[:, :-1], batch[:, 1:]
    tokens = x.numel()

    torch.manual_seed(0)
    model = build_model(config, "cpu")
    optimizers = setup_optimizers(model)

    def train_step(model, optimizers):
        def step():
            loss = model(x, y)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        return step

    arms = {"ours": train_step(model, optimizers)}
    if args.baseline_tree is not None:
        old_gpt, old_optim = load_tree_modules(args.baseline_tree)
        torch.manual_seed(0)
        old_model = old_gpt.build_model(old_gpt.config_from_depth(args.depth, args.vocab, max_seq_len=args.seq,
                                                                  head_dim=args.head_dim), "cpu")
        arms["baseline tree"] = train_step(old_model, old_optim.setup_optimizers(old_model))

    torch.manual_seed(0)
    ref_model = build_model(config, "cpu")
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-10)

    def reference():
        logits = ref_model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    print(f"depth {args.depth} width {config.n_embd} heads {config.n_head} seq {args.seq} batch {args.batch} "
          f"vocab {args.vocab} threads {torch.get_num_threads()} params {model.num_params():,}")
    # interleave, and keep the best of two rounds, so background load on a shared machine hits all sides alike
    arms = {"reference": reference, **arms}
    rounds = {name: [] for name in arms}
    for round_ in range(2):
        for name, step in arms.items():
            rounds[name].append(time_steps(step, args.warmup if round_ == 0 else 0, args.steps))
    wall = {k: min(w for w, _ in v) for k, v in rounds.items()}
    cpu = {k: min(c for _, c in v) for k, v in rounds.items()}
    labels = {"reference": "reference (full logits + AdamW)   ", "ours": "ours (model loss + Muon/AdamW)    ",
              "baseline tree": f"ours as in {args.baseline_tree}"[:34].ljust(34)}
    for name in arms:
        print(f"{labels[name]} wall {wall[name]:6.2f} s/step {tokens / wall[name]:7.0f} tok/s | "
              f"cpu {cpu[name]:6.2f} s/step {tokens / cpu[name]:7.0f} tok/cpu-s")
    print(f"ratio ours/reference: wall {wall['reference'] / wall['ours']:.2f}x, "
          f"cpu {cpu['reference'] / cpu['ours']:.2f}x (nanochat issue figure for this shape: ~1030 tok/s)")
    if "baseline tree" in arms:
        print(f"ratio ours/baseline tree: wall {wall['baseline tree'] / wall['ours']:.2f}x, "
              f"cpu {cpu['baseline tree'] / cpu['ours']:.2f}x")

if __name__ == "__main__":
    main()
