"""Pretraining sources: hub downloads (FineWeb-Edu, ClimbMix), local files and weighted mixtures of them.

Downloads always include the source's final shard (fineweb-edu shard_01822) as the validation shard, and
fetch it first: the val set is then the same whatever --num-shards says, and a background download that
keeps adding train shards never changes which shard is val. Each shard lands atomically (verified, then
renamed), so a tokenizer started while the download runs in the background only ever sees complete shards.
"""

import json
import random
from pathlib import Path

from nanopipe.common import UserError, disk_full_error, file_sha256, iter_text_lines, read_text_file
from nanopipe.download import DownloadJob, HubFile, download_many, resolve_revision, retry_kwargs
from nanopipe.shard_writer import ShardWriter, write_manifest
from nanopipe.shards import (BUILD_COMMANDS, PRETRAIN_SOURCES, dataset_dir, open_shard, read_manifest, read_texts,
                             verify_text_shard)

SHARD_BYTES = 100_000_000  # about the size of one downloaded shard


def download_pretrain(name, num_shards, workers=4, revision=None, **download_kwargs):
    """Download `num_shards` shards of a pretraining source (the last being its final shard, for val).

    Every file is fetched at one commit of the source repo: `revision` (a branch, tag or sha) resolved once, or
    the commit the dataset's manifest recorded when it was first downloaded, so adding shards later never mixes
    two versions of the source. Verified shards already on disk are skipped; the manifest is rewritten.
    Returns the DownloadSummary.
    """
    repo, last = PRETRAIN_SOURCES[name]
    if num_shards < 2:
        raise UserError(f"--num-shards {num_shards}: need at least 2 (train shards + the val shard)")
    if num_shards > last + 1:
        print(f"{name} has {last + 1} shards; downloading all of them")
        num_shards = last + 1
    out = dataset_dir(name)
    pinned = ((read_manifest(out) or {}).get("source") or {}).get("revision")
    if pinned and revision and revision != pinned:
        raise UserError(f"--revision {revision}: the shards in {out} are from revision {pinned}; download another "
                        f"revision into a fresh base dir (NANOPIPE_BASE_DIR), or delete {out} first")
    sha = pinned or resolve_revision(repo, revision or "main", **retry_kwargs(download_kwargs))
    indices = [last] + list(range(num_shards - 1))  # val first: it never changes and stages need it
    jobs = [DownloadJob(hub.url, out / hub.filename, verify_text_shard, hub=hub)
            for hub in (HubFile(repo, f"shard_{i:05d}.parquet", sha) for i in indices)]
    print(f"downloading {num_shards} shards of {repo} (revision {sha}) to {out} with {workers} workers")
    summary = download_many(jobs, workers=workers, **download_kwargs)
    print(summary.format())
    if any("No space left" in r.reason for r in summary.failed):
        sizes = [p.stat().st_size for p in out.glob("shard_*.parquet")] or [SHARD_BYTES]
        raise disk_full_error(out, max(sizes) * len(summary.failed), f"downloading {len(summary.failed)} more shard(s)")
    url = HubFile(repo, "shard_{i:05d}.parquet", sha).url
    update_download_manifest(out, {"kind": "download", "repo": repo, "revision": sha, "url": url},
                             f"shard_{last:05d}.parquet")
    return summary



def update_download_manifest(out_dir, source, val_file):
    """Rewrite manifest.json to list the shards on disk, the val shard `val_file` last; hashes only the new ones.

    The downloader renames a shard into place only once verified, so the shards present are the verified
    ones; readers see only what the manifest lists. Without `val_file` the manifest lists no val shard and
    readers refuse the dataset, naming the command that fetches it.
    """
    known = {s["file"]: s for s in (read_manifest(out_dir) or {}).get("shards", []) if isinstance(s, dict)}
    shards = sorted(Path(out_dir).glob("shard_*.parquet"), key=lambda p: (p.name == val_file, p.name))
    entries = []
    for path in shards:
        size = path.stat().st_size
        entry = known.get(path.name)
        if entry is None or entry.get("bytes") != size or "sha256" not in entry:
            entry = {"file": path.name, "docs": open_shard(path).metadata.num_rows, "bytes": size,
                     "sha256": file_sha256(path)}
        entry["split"] = "val" if path.name == val_file else "train"
        entries.append(entry)
    return write_manifest(out_dir, source, entries)



LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def local_files(path):
    """The readable files under `path` (itself if a file), in sorted order."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not path.exists():
        raise UserError(f"no such file or folder: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"cannot read {path}: supported files are {', '.join(LOCAL_SUFFIXES)}")
    return [path]


def iter_file_documents(path):
    """Documents of one file: a .txt/.md file is one document, .jsonl rows' `text`, .parquet's `text` column."""
    if path.suffix in (".txt", ".md"):
        text = read_text_file(path)
        if text.strip():
            yield text
    elif path.suffix == ".jsonl":
        for lineno, line in iter_text_lines(path):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: \"text\" is {type(text).__name__}, not a string: "
                                "write each document as {\"text\": \"...\"}")
            if text:
                yield text
    else:
        pf = open_shard(path)
        for row_group in range(pf.num_row_groups):
            yield from (t for t in read_texts(pf, row_group, path) if t)


def iter_local_documents(path):
    for f in local_files(path):
        yield from iter_file_documents(f)


def mix_documents(sources, weights=None, seed=0):
    """Yield (source_index, text) from several document iterables.

    Without weights the sources are concatenated. With weights, each next document comes from a source
    drawn with those probabilities by random.Random(seed) (same seed, same order), and the mix stops when
    the drawn source runs dry, so the proportions hold over the whole output.
    """
    iterators = [iter(s) for s in sources]
    if weights is None:
        for i, it in enumerate(iterators):
            for text in it:
                yield i, text
        return
    rng = random.Random(seed)
    indices = range(len(iterators))
    while True:
        i = rng.choices(indices, weights)[0]
        text = next(iterators[i], None)
        if text is None:
            return
        yield i, text


def build_local(name, paths, weights=None, seed=0, docs_per_shard=50_000, val_every=100, row_group_size=1000):
    """Build data/<name>/ from local files; every `val_every`-th document (from the first) goes to val."""
    if not name or "/" in name or name.startswith(".") or name in BUILD_COMMANDS:
        raise UserError(f"--name {name!r}: pick a plain folder name other than {', '.join(BUILD_COMMANDS)}")
    if weights is not None and len(weights) != len(paths):
        raise UserError(f"--weights has {len(weights)} values for {len(paths)} paths: give one weight per path")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise UserError(f"--weights {weights}: weights must be >= 0 with a positive sum")
    for p in paths:
        if not local_files(p):
            raise UserError(f"no {'/'.join(LOCAL_SUFFIXES)} files under {p}")
    out = dataset_dir(name)
    source = {"kind": "local", "paths": [str(Path(p).resolve()) for p in paths], "weights": weights, "seed": seed,
              "val_every": val_every}
    counts = [0] * len(paths)
    input_bytes = sum(f.stat().st_size for p in paths for f in local_files(p))
    with ShardWriter(out, docs_per_shard, row_group_size, source, expected_text_bytes=input_bytes) as writer:
        mixed = mix_documents([iter_local_documents(p) for p in paths], weights, seed)
        for n, (i, text) in enumerate(mixed):
            writer.write(text, val=n % val_every == 0)
            counts[i] += 1
        if not writer.entries and writer.train is None:
            raise UserError(f"{sum(counts)} document(s) in {', '.join(map(str, paths))}: need at least 2 (train + val)")
    for p, c in zip(paths, counts):
        print(f"{c:>10,} docs from {p}")
    print(f"wrote {out}")
    return out

