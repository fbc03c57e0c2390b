"""Data throughput: streaming reads vs whole-file reads, and the downloader vs plain requests, same run.

    python bench/bench_data.py [--repeats 5]

1. Text read+yielded by shards.iter_documents (row group at a time, with positions) vs the baseline
   pq.read_table(whole file).to_pylist() then iterate. Uses ../shared/data/corpus when present, else a
   generated ~60 MB corpus.
2. Download MB/s from a loopback HTTP server: download.download_many (verify + atomic rename, 4 workers)
   and download_file one by one, vs plain `requests.get(stream=True)` + iter_content to disk, one by one
   (also shown with an fsync per file: ours fsyncs before the rename so a crash never leaves a torn shard).
Prints MB/s and ratios (>1 means ours is faster).
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanopipe import shard_writer, shards  # noqa: E402
from nanopipe.download import DownloadJob, download_file, download_many  # noqa: E402

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def prepare_corpus(base):
    """data/bench/ under `base`: links to the shared corpus shards, or a generated corpus."""
    out = base / "data" / "bench"
    out.mkdir(parents=True)
    if SHARED_CORPUS.exists():
        for shard in sorted(SHARED_CORPUS.glob("shard_*.parquet")):
            (out / shard.name).symlink_to(shard)
        return "shared/data/corpus"
    words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
    with shard_writer.ShardWriter(out, 4000) as writer:
        for i in range(15_000):
            writer.write(" ".join(words[(i * j) % len(words)] for j in range(700)))
    return "generated"


def read_streaming():
    n = 0
    for text, _ in shards.iter_documents("bench", "train"):
        n += len(text.encode("utf-8"))
    return n


def read_whole_files():
    n = 0
    for path in shards.list_shards("bench")[0]:
        for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
            n += len(text.encode("utf-8"))
    return n


def requests_baseline(urls, out, fsync=False):
    for url in urls:
        with requests.get(url, stream=True, timeout=30) as r, open(out / url.rsplit("/", 1)[1], "wb") as f:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data."))
    os.environ["NANOPIPE_BASE_DIR"] = str(tmp / "base")
    try:
        source = prepare_corpus(tmp / "base")
        read_streaming()  # warm the page cache for both contenders
        t_stream, nbytes = best_of(args.repeats, read_streaming)
        t_whole, nbytes_whole = best_of(args.repeats, read_whole_files)
        assert nbytes == nbytes_whole
        mb = nbytes / 1e6
        print(f"read ({source}, {mb:.0f} MB of text, best of {args.repeats})")
        print(f"  iter_documents (streaming)   {mb / t_stream:8.1f} MB/s")
        print(f"  read_table whole file        {mb / t_whole:8.1f} MB/s")
        print(f"  ratio streaming / whole-file {t_whole / t_stream:8.2f}x")

        served = tmp / "served"
        shutil.copytree(tmp / "base" / "data" / "bench", served, symlinks=False,
                        ignore=shutil.ignore_patterns("manifest.json"))
        handler = functools.partial(QuietHandler, directory=str(served))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        names = sorted(p.name for p in served.glob("shard_*.parquet"))
        urls = [f"http://127.0.0.1:{server.server_address[1]}/{name}" for name in names]
        total_mb = sum((served / n).stat().st_size for n in names) / 1e6

        def fresh_dir(name):
            d = tmp / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            return d

        def ours_sequential():
            out = fresh_dir("ours1")
            for url in urls:
                download_file(url, out / url.rsplit("/", 1)[1], verify=shards.verify_text_shard)

        def ours_parallel():
            out = fresh_dir("ours4")
            jobs = [DownloadJob(url, out / url.rsplit("/", 1)[1], shards.verify_text_shard) for url in urls]
            assert not download_many(jobs, workers=4, show_progress=False).failed

        t_base, _ = best_of(args.repeats, lambda: requests_baseline(urls, fresh_dir("base_dl")))
        t_sync, _ = best_of(args.repeats, lambda: requests_baseline(urls, fresh_dir("base_sync"), fsync=True))
        t_seq, _ = best_of(args.repeats, ours_sequential)
        t_par, _ = best_of(args.repeats, ours_parallel)
        server.shutdown()
        print(f"download ({len(urls)} files, {total_mb:.0f} MB, loopback, best of {args.repeats})")
        print(f"  requests.get + iter_content      {total_mb / t_base:8.1f} MB/s")
        print(f"  requests + fsync per file        {total_mb / t_sync:8.1f} MB/s   (the durable baseline)")
        print(f"  download_file (verify, rename)   {total_mb / t_seq:8.1f} MB/s   ratio {t_base / t_seq:.2f}x, "
              f"vs durable {t_sync / t_seq:.2f}x")
        print(f"  download_many 4 workers          {total_mb / t_par:8.1f} MB/s   ratio {t_base / t_par:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
