"""Tokenizer training speed and compression against rustbpe (the trainer nanochat uses), and encode throughput.

    .venv/bin/pip install rustbpe      # only for this benchmark
    python -m bench.bench_tokenizer [--corpus DIR] [--vocab-size 32768] [--doc-cap 10000] [--repeats 2]

Both trainers get the same documents (the train shards of DIR, each capped at --doc-cap chars) and the same
split pattern; compression is bytes/token on DIR's validation shard. Timings alternate ours/theirs and keep
each side's best, so a neighbour's load burst hurts neither side alone. The printed ratios come from this one
run; absolute seconds depend on the machine and its load.
"""

import argparse
import resource
import time
from pathlib import Path

import pyarrow.parquet as pq

from nanopipe.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, _new_hf_tokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def read_docs(paths, cap=None):
    docs = []
    for path in paths:
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        docs.extend(t[:cap] for t in texts if t)
    return docs


def cpu_seconds():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def bytes_per_token(token_lists, docs):
    return sum(len(d.encode("utf-8")) for d in docs) / sum(len(t) for t in token_lists)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of parquet shards, last = val")
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--doc-cap", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1, help="alternating timing rounds; best of each side")
    parser.add_argument("--plain", action="store_true", help="also time the plain tokenizers BpeTrainer on raw text")
    args = parser.parse_args(argv)

    shards = sorted(args.corpus.glob("shard_*.parquet"))
    if len(shards) < 2:
        raise SystemExit(f"error: need train + val parquet shards in {args.corpus}")
    docs = read_docs(shards[:-1], args.doc_cap)
    val = read_docs(shards[-1:])
    chars = sum(map(len, docs))
    print(f"corpus {args.corpus}: {len(docs)} train docs, {chars / 1e6:.1f} M chars (cap {args.doc_cap}); "
          f"val {len(val)} docs; vocab {args.vocab_size}")

    try:
        import rustbpe
    except ImportError:
        rustbpe = None
        print("rustbpe is not installed (`.venv/bin/pip install rustbpe`): timing ours only")

    def train_ours():
        stats = {}
        return Tokenizer.train(iter(docs), args.vocab_size, stats=stats), stats

    def train_rustbpe():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), args.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        return tok

    def train_plain():
        from tokenizers import pre_tokenizers, trainers
        hf = _new_hf_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(iter(docs), trainer)
        return hf

    best = {}
    for _ in range(args.repeats):
        rounds = [("ours", train_ours)] + ([("rustbpe", train_rustbpe)] if rustbpe else []) \
            + ([("plain tokenizers", train_plain)] if args.plain else [])
        for name, fn in rounds:
            result, wall, cpu = timed(fn)
            print(f"  train {name:17s} {wall:6.2f} s wall  {cpu:6.2f} s cpu")
            if name not in best or wall < best[name][1]:
                best[name] = (result, wall, cpu)

    (ours, stats), our_wall, _ = best["ours"]
    our_bpt = bytes_per_token(ours.encode(val), val)
    print(f"\nours: {our_wall:.2f} s, {chars / our_wall / 1e6:.1f} M chars/s, {our_bpt:.4f} bytes/token on val "
          f"({stats['chunks'] / 1e6:.2f} M chunks, {stats['distinct_chunks'] / 1e6:.2f} M distinct per partition, "
          f"trainer fed 1/{stats['feed_scale']})")
    if rustbpe:
        theirs, their_wall, _ = best["rustbpe"]
        their_bpt = bytes_per_token(theirs.batch_encode(val), val)
        print(f"rustbpe: {their_wall:.2f} s, {their_bpt:.4f} bytes/token on val")
        print(f"training time ours / rustbpe: {our_wall / their_wall:.2f}x   "
              f"compression ours vs rustbpe: {100 * (our_bpt / their_bpt - 1):+.2f} %")
    if args.plain:
        plain, plain_wall, _ = best["plain tokenizers"]
        print(f"plain tokenizers: {plain_wall:.2f} s; ours / plain: {our_wall / plain_wall:.2f}x")

    # batch encoding as the dataloader does it: ~8 MB of train documents in lists of 128
    texts, size = [], 0
    for doc in docs:
        texts.append(doc)
        size += len(doc.encode("utf-8"))
        if size > 8e6:
            break
    batches = [texts[i:i + 128] for i in range(0, len(texts), 128)]
    _, wall, _ = timed(lambda: [ours.encode(b) for b in batches])
    line = f"\nencode {size / 1e6:.1f} MB in batches of 128 docs: ours {size / 1e6 / wall:.2f} MB/s"
    if rustbpe:
        _, their_wall, _ = timed(lambda: [theirs.batch_encode(b) for b in batches])
        line += f", rustbpe {size / 1e6 / their_wall:.2f} MB/s (ours / rustbpe throughput {their_wall / wall:.2f}x)"
    print(line)


if __name__ == "__main__":
    main()
