"""
Train the byte-level BPE tokenizer on the start of a dataset's train split and save it to <base>/tokenizer.

    python -m scripts.tok_train                                   # 32768 tokens, first 2 B chars
    python -m scripts.tok_train --vocab-size 8192 --max-chars 50000000 --data synthetic

Documents are streamed and each is cut to --doc-cap characters; reading stops after --max-chars, so memory
grows with --max-chars (the distinct text chunks counted), never with the size of the dataset.
"""

import time


from nanopipe import cli
from nanopipe.common import UserError, get_base_dir, print0
from nanopipe.progress import Progress
from nanopipe.shards import iter_documents, list_shards
from nanopipe.stage import Stage
from nanopipe.tokenizer import DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer
from tasks.profile import default_data_name

MAX_VOCAB_SIZE = 2**31 - 1  # token ids are int32 in checkpoints (the dataloader's buffer state)


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="python -m scripts.tok_train", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--vocab-size", type=cli.integer(256 + len(SPECIAL_TOKENS) + 1, MAX_VOCAB_SIZE),
                        default=DEFAULT_VOCAB_SIZE, help="tokens: 256 bytes, the 9 specials and at least one merge")
    parser.add_argument("--max-chars", type=cli.integer(1), default=2_000_000_000,
                        help="characters of text to train on")
    parser.add_argument("--doc-cap", type=cli.integer(1), default=10_000, help="characters kept from each document")
    parser.add_argument("--data", type=cli.name, default=None,
                        help="dataset name (default: $NANOPIPE_DATA or fineweb-edu)")
    return parser.parse_args(argv)


def training_texts(name, max_chars, doc_cap, totals, progress):
    """The first max_chars characters of the train split, each document cut to doc_cap."""
    for text, _ in iter_documents(name, "train"):
        text = text[:doc_cap]
        totals["docs"] += 1
        totals["chars"] += len(text)
        totals["bytes"] += len(text.encode("utf-8"))
        progress.update(len(text))
        yield text
        if totals["chars"] >= max_chars:
            break
    progress.close()
    print0(f"read {totals['chars']:,} chars; learning the BPE merges")


def main(argv=None):
    args = parse_args(argv)
    with Stage("tok_train", args) as stage:
        name = default_data_name(args.data)
        list_shards(name)  # fail before the progress bar if the dataset is missing
        totals = {"docs": 0, "chars": 0, "bytes": 0}
        stats = {}
        start = time.perf_counter()
        with Progress(args.max_chars, f"reading {name}", unit="chars") as progress:
            texts = training_texts(name, args.max_chars, args.doc_cap, totals, progress)
            try:
                tokenizer = Tokenizer.train(texts, args.vocab_size, stats=stats)
            except ValueError as e:  # too little text for the vocab, or a vocab too small
                raise UserError(f"cannot train a {args.vocab_size}-token tokenizer on dataset {name}: {e}") from None
        seconds = time.perf_counter() - start
        out = get_base_dir() / "tokenizer"
        tokenizer.save(out)
        mb_per_sec = totals["bytes"] / 1e6 / seconds
        print0(f"saved {out}: {tokenizer.vocab_size} tokens, trained on {totals['chars']:,} chars "
               f"({totals['docs']:,} docs) in {seconds:.1f}s ({mb_per_sec:.1f} MB/s)")
        data = {"vocab_size": tokenizer.vocab_size, "data": name, "docs": totals["docs"], "chars": totals["chars"],
                "bytes": totals["bytes"], "train_seconds": round(seconds, 2), "mb_per_sec": round(mb_per_sec, 2),
                "chunks": stats["chunks"], "distinct_chunks": stats["distinct_chunks"],
                "feed_scale": stats["feed_scale"]}
        scale = "every chunk occurrence (exact BPE)" if stats["feed_scale"] == 1 else \
            f"1/{stats['feed_scale']} of the chunk occurrences, sampled per chunk-prefix stratum"
        md = "\n".join([
            "| | |", "|---|---|",
            f"| vocab size | {tokenizer.vocab_size:,} (9 special tokens) |",
            f"| dataset | `{name}`, train split |",
            f"| text | {totals['chars']:,} chars, {totals['bytes']:,} bytes, {totals['docs']:,} docs "
            f"(cap {args.doc_cap:,} chars each) |",
            f"| chunks | {stats['chunks']:,} ({stats['distinct_chunks']:,} distinct per partition, summed); "
            f"BPE trainer fed {scale} |",
            f"| training time | {seconds:.1f} s ({mb_per_sec:.1f} MB/s) |",
            f"| saved to | `{out}` |",
        ])
        stage.report(md, data)


if __name__ == "__main__":
    main()
