"""
CORE evaluation: batched (nanopipe.core_eval) vs one item at a time (the reference's loop: each item's
prompts padded to their longest and run as one forward pass), same model, same tasks, same prompts.
Prints both times and the ratio, and checks that both give identical accuracies.

    python -m bench.bench_core_eval [--bundle DIR] [--depth 4] [--max-per-task 12] [--batch-size 16] [--threads N]

The bundle defaults to ../shared/data/core_sample when present, else the synthetic world's bundle
(written to a temp dir). The model is a randomly initialised depth-N GPT: the timing does not depend on
what it knows.
"""

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from nanopipe.core_eval import evaluate_core, load_bundle, prepare_task, select_items
from nanopipe.gpt import build_model, config_from_depth
from tasks.world.core import write_core_bundle
from tasks.world.documents import generate_documents
from tasks.world.facts import build_world
from nanopipe.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def training_texts():
    """Real text for the tokenizer when ../shared/data/corpus is present (first row group), else synthetic."""
    shards = sorted((SHARED_DATA / "corpus").glob("*.parquet"))
    if shards:
        import pyarrow.parquet as pq
        return pq.ParquetFile(shards[0]).read_row_group(0, columns=["text"]).column("text").to_pylist()
    return list(generate_documents(0, 3000))


@torch.no_grad()
def reference_accuracy(model, tokenizer, task, max_per_task, max_seq_len):
    """One item per forward pass: its choices (or its one LM prompt) padded with bos to the longest."""
    items = select_items(task.items, max_per_task)
    sequences, plan = prepare_task(task, tokenizer, items, range(len(items)), max_seq_len)
    bos = tokenizer.bos_token_id
    correct = 0
    for first, count, gold in plan:
        seqs = sequences[first:first + count]
        width = max(len(t) for t, _, _ in seqs)
        ids = torch.full((count, width), bos, dtype=torch.long)
        for r, (t, _, _) in enumerate(seqs):
            ids[r, :len(t)] = torch.tensor(t)
        logits = model(ids)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        predictions = logits[:, :-1].argmax(-1)
        if task.task_type == "language_modeling":
            _, s, e = seqs[0]
            correct += bool((predictions[0, s - 1:e - 1] == ids[0, s:e]).all())
        else:
            mean_losses = [losses[r, s - 1:e - 1].mean().item() for r, (_, s, e) in enumerate(seqs)]
            correct += mean_losses.index(min(mean_losses)) == gold
    return correct / len(items)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-per-task", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench_core_")
    bundle = Path(args.bundle) if args.bundle else SHARED_DATA / "core_sample"
    if not (bundle / "core.yaml").exists():
        bundle = Path(workdir) / "bundle"
        write_core_bundle(0, build_world(0), bundle)
    print(f"bundle: {bundle}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.train(iter(training_texts()), vocab_size=args.vocab_size)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, tokenizer.vocab_size, max_seq_len=args.max_seq_len, head_dim=64)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    print(f"model: depth {args.depth}, {model.num_params() / 1e6:.1f}M params, vocab {tokenizer.vocab_size}, "
          f"torch threads {torch.get_num_threads()}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tasks, _ = load_bundle(bundle)
        reference, reference_seconds = {}, {}
        for task in tasks:
            t0 = time.perf_counter()
            reference[task.label] = reference_accuracy(model, tokenizer, task, args.max_per_task, args.max_seq_len)
            reference_seconds[task.label] = time.perf_counter() - t0
        t_reference = sum(reference_seconds.values())
        t0 = time.perf_counter()
        result = evaluate_core(model, tokenizer, bundle, "cpu", max_per_task=args.max_per_task,
                               batch_size=args.batch_size, max_seq_len=args.max_seq_len, show_progress=False)
        t_batched = time.perf_counter() - t0

    batched = {label: r["accuracy"] for label, r in result["tasks"].items()}
    for label in reference:
        flag = "" if reference[label] == batched[label] else "   <-- differs"
        seconds = result["tasks"][label]["seconds"]
        print(f"{label:<35} accuracy one-at-a-time {reference[label]:.4f} batched {batched[label]:.4f}   "
              f"time {reference_seconds[label]:6.2f}s -> {seconds:6.2f}s "
              f"({reference_seconds[label] / seconds:4.1f}x){flag}")
    print(f"one item at a time: {t_reference:.1f}s   batched (batch {args.batch_size}): {t_batched:.1f}s   "
          f"speedup {t_reference / t_batched:.2f}x")
    assert reference == batched, "batched accuracies differ from one-at-a-time"


if __name__ == "__main__":
    main()
