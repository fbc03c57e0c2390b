"""Pretraining loader throughput: tokens per second one rank's PretrainLoader delivers, against what one rank of a
d20 run on 8xH100 consumes at 45% MFU; and the encoder it runs on (tiktoken) against the HF tokenizers encoder.

    python bench/bench_loader.py [--corpus DIR] [--threads 4] [--seconds 20] [--vocab 32768]

An 8-GPU node with ~32-64 cores leaves a rank ~4 of them for its loader, so the loader's tokenizer runs on
--threads threads. Each figure is measured in its own child process. The baselines in the same run: the same
loader on one thread, and the HF tokenizers encoder (what the loader used before) on one thread over the same
documents, checked to give the same ids. The demand is derived here: the d20 model's FLOPs per token (seq 2048,
vocab 32,768, as nanopipe.gpt counts them) and the H100 SXM's bf16 peak (nanopipe.common.PEAK_FLOPS):
0.45 x peak / (FLOPs per token). The ratio delivered / demanded must be >= 3 so that the loader never shows
in the step time.

--corpus: a folder of parquet shards with a text column (default: ../shared/data/corpus when present, else
synthetic-world documents); a tokenizer is trained on it (vocab --vocab), all in a temp dir.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CORPUS = next((p / "shared" / "data" / "corpus" for p in (REPO.parent, REPO.parent.parent)
                      if (p / "shared" / "data" / "corpus").exists()), REPO.parent / "shared" / "data" / "corpus")
MFU = 0.45
GPU = "NVIDIA H100 80GB HBM3"  # as torch.cuda.get_device_name() says an H100 SXM


def demand_tokens_per_second() -> tuple[float, float, float]:
    """(tok/s one d20 rank consumes at MFU on an H100 SXM, FLOPs per token, peak FLOP/s)."""
    import torch

    from nanopipe.common import peak_flops_of
    from nanopipe.gpt import GPT, config_from_depth
    with torch.device("meta"):
        flops = GPT(config_from_depth(20, 32768, 2048)).flops_per_token()
    peak = peak_flops_of(GPU)
    return MFU * peak / flops, flops, peak


def build(base: Path, corpus: Path | None, vocab: int) -> str:
    """Dataset `bench` and a tokenizer under `base`; returns where the documents came from."""
    import pyarrow.parquet as pq

    from nanopipe.shard_writer import ShardWriter
    from nanopipe.tokenizer import Tokenizer
    if corpus is not None:
        texts = [t for path in sorted(corpus.glob("*.parquet"))
                 for t in pq.read_table(path, columns=["text"]).column(0).to_pylist()]
        source = str(corpus)
    else:
        from tasks.world.documents import generate_documents
        texts = list(generate_documents(0, 20_000))
        source = "synthetic world"
    with ShardWriter(base / "data" / "bench", 1000) as writer:
        for i, text in enumerate(texts):
            writer.write(text, val=i % 50 == 49)
    tokenizer = Tokenizer.train(iter(texts), vocab_size=vocab)
    tokenizer.save(base / "tokenizer")
    return f"{source}: {len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} M chars"


def measure(base: Path, threads: int, seconds: float, batch: int, seq: int) -> dict:
    """The loader on `threads` tokenizer threads, in a child process."""
    code = f"""
import json, time
from nanopipe.dataloader import PretrainLoader
from nanopipe.tokenizer import Tokenizer
tok = Tokenizer.load({str(base / "tokenizer")!r})
loader = PretrainLoader(tok, "bench", "train", {batch}, {seq}, tokenizer_threads={threads})
next(loader)  # the first buffer fill
t0, c0, n = time.perf_counter(), time.process_time(), 0
while time.perf_counter() - t0 < {seconds}:
    x, _ = next(loader)
    n += x.numel()
print(json.dumps({{"tokens": n, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}}))
"""
    result = _child(base, code)
    return {"threads": threads, "tok_per_s": result["tokens"] / result["seconds"],
            "tok_per_cpu_s": result["tokens"] / result["cpu_seconds"]}


def measure_encoders(base: Path, max_chars: int) -> dict:
    """tok/s of HF tokenizers (encode_batch_fast on a 1-thread pool) and of Tokenizer.encode (tiktoken, one
    thread) over the first `max_chars` of the train documents, and how many documents' ids differ."""
    code = f"""
import json, time
from nanopipe.shards import iter_documents
from nanopipe.tokenizer import Tokenizer
tok = Tokenizer.load({str(base / "tokenizer")!r})
texts, chars = [], 0
for text, _ in iter_documents("bench", "train", 0, 1):
    texts.append(text)
    chars += len(text)
    if chars >= {max_chars}:
        break
t0 = time.perf_counter()
hf = [e.ids for e in tok._hf.encode_batch_fast(texts, add_special_tokens=False)]
t1 = time.perf_counter()
ours = tok.encode(texts, num_threads=1)
t2 = time.perf_counter()
n = sum(map(len, hf))
print(json.dumps({{"hf": n / (t1 - t0), "ours": n / (t2 - t1), "docs": len(texts), "tokens": n,
                  "differ": sum(a != b for a, b in zip(hf, ours))}}))
"""
    return _child(base, code)


def _child(base: Path, code: str) -> dict:
    env = dict(os.environ, NANOPIPE_BASE_DIR=str(base), RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=SHARED_CORPUS if SHARED_CORPUS.exists() else None)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--vocab", type=int, default=32768)
    args = p.parse_args()
    if args.corpus is not None and not list(args.corpus.glob("*.parquet")):
        print(f"error: --corpus {args.corpus}: no .parquet shards there; give a folder of shards with a text "
              f"column, or leave --corpus out for synthetic documents", file=sys.stderr)
        sys.exit(2)
    demand, flops, peak = demand_tokens_per_second()
    print(f"demand: d20 (seq 2048) = {flops:.3e} FLOPs/token; one H100 SXM rank at {MFU:.0%} of {peak / 1e12:.0f} "
          f"TFLOPS consumes {demand:,.0f} tok/s")
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        base = Path(tmp)
        print(f"data: {build(base, args.corpus, args.vocab)}; tokenizer vocab {args.vocab:,}")
        cores = os.cpu_count()
        encoders = measure_encoders(base, 4_000_000)
        baseline = measure(base, 1, args.seconds, 32, 2048)
        ours = measure(base, args.threads, args.seconds, 32, 2048)
    print(f"encode, 1 thread, {encoders['docs']:,} documents ({encoders['tokens']:,} tokens): HF tokenizers "
          f"{encoders['hf']:,.0f} tok/s (baseline), tiktoken {encoders['ours']:,.0f} tok/s: "
          f"{encoders['ours'] / encoders['hf']:.2f}x; documents whose ids differ: {encoders['differ']}")
    print(f"loader, 1 thread (baseline):   {baseline['tok_per_s']:12,.0f} tok/s")
    print(f"loader, {args.threads} threads:             {ours['tok_per_s']:12,.0f} tok/s "
          f"({ours['tok_per_s'] / args.threads:,.0f} per thread; {cores} cores here"
          + (", so the threads share them" if cores < args.threads else "") + ")")
    print(f"speed-up {args.threads} threads / 1 thread:  {ours['tok_per_s'] / baseline['tok_per_s']:.2f}x")
    print(f"ratio delivered / demanded:    {ours['tok_per_s'] / demand:.2f}x  (must be >= 3; measured on this machine)")
    # on a shared or small machine the threads wait for cores: CPU time is what a thread delivers when it has one
    per_cpu = ours["tok_per_cpu_s"]
    print(f"per CPU-second: {per_cpu:,.0f} tok (1 thread: {baseline['tok_per_cpu_s']:,.0f}); {args.threads} threads "
          f"with a core each: {args.threads * per_cpu:,.0f} tok/s, ratio {args.threads * per_cpu / demand:.2f}x")


if __name__ == "__main__":
    main()
