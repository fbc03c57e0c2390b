"""Text datasets as parquet shards: download (FineWeb-Edu, ClimbMix), local files; streaming reads.

A dataset is `<base>/data/<name>/shard_NNNNN.parquet` (one `text` column, one document per row, row groups
of ~1000 docs) plus `manifest.json`. The LAST shard (sorted by name) is validation, all others are train.

The CLI is `python -m scripts.dataset` (download, local, synthetic, chat-data, eval-bundle, verify); the
synthetic world's own source is tasks/world/source.py.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanopipe import cli
from nanopipe.common import (UserError, atomic_write_text, disk_full_error, disk_space, get_base_dir, is_disk_full,
                             iter_text_lines, read_text_file, replace_dir, temp_dir_beside)
from nanopipe.download import (DownloadError, DownloadJob, HubFile, download_file, download_many, hf_endpoint,
                               resolve_revision)

DEFAULT_DATA = "fineweb-edu"
# name -> (HF dataset repo, index of its last shard)
PRETRAIN_SOURCES = {
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822),
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542),
}
SHARD_BYTES = 100_000_000  # about the size of one downloaded shard
SHARD_SCHEMA = pa.schema([("text", pa.string())])
# fixed codec and level so the same documents always give the same bytes
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3)


def default_data_name(flag=None):
    """The dataset a stage reads: its --data flag, else $NANOPIPE_DATA, else fineweb-edu."""
    if flag:
        return flag
    name = os.environ.get("NANOPIPE_DATA") or DEFAULT_DATA
    try:
        return cli.check_name(name, "NANOPIPE_DATA")
    except ValueError as e:
        raise UserError(str(e)) from None


def dataset_dir(name) -> Path:
    return get_base_dir() / "data" / name


def make_command(name):
    """The command that creates dataset `name`, for error messages."""
    if name in PRETRAIN_SOURCES:
        return f"python -m scripts.dataset download {name} --num-shards 8"
    if name == "synthetic":
        return "python -m scripts.dataset synthetic"
    return f"python -m scripts.dataset local --name {name} PATH..."


def read_manifest(out_dir):
    """manifest.json of a dataset folder as a dict; None when absent or unreadable (a build rewrites it)."""
    path = Path(out_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest_shards(name, folder):
    """The shard entries of a dataset's manifest; UserError when there is no (readable) manifest."""
    path = folder / "manifest.json"
    if not path.exists():
        if any(folder.glob("shard_*.parquet")):
            raise UserError(f"dataset {folder} has shards but no manifest.json: its build was interrupted (or made "
                            f"by an older nanopipe), so it may be incomplete: run `{make_command(name)}` to rebuild it")
        raise UserError(f"no dataset in {folder}: run `{make_command(name)}` first")
    manifest = read_manifest(folder)
    shards = manifest.get("shards") if manifest else None
    if not isinstance(shards, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                               and e.get("split") in ("train", "val")
                                               and isinstance(e.get("bytes"), int) for e in shards):
        raise UserError(f"unreadable manifest {path}: run `{make_command(name)}` to rebuild the dataset")
    return shards


def list_shards(name, check_sha256=False):
    """(train_paths, val_path) of dataset `name`: exactly the shards its manifest.json lists.

    A dataset is readable only once its manifest is written, and only its listed shards count (a download in
    progress adds files that are not listed yet). Every listed shard must be present with the listed size;
    check_sha256 also hashes them (`python -m scripts.dataset verify NAME`).
    """
    folder = dataset_dir(name)
    shards = _manifest_shards(name, folder)
    train = [e for e in shards if e["split"] == "train"]
    val = [e for e in shards if e["split"] == "val"]
    if name in PRETRAIN_SOURCES:
        # the val shard of a download is the source's final shard, never a train shard standing in for it
        val_file = f"shard_{PRETRAIN_SOURCES[name][1]:05d}.parquet"
        if [e["file"] for e in val] != [val_file]:
            raise UserError(f"dataset {folder} lacks its val shard {val_file}: run "
                            f"`python -m scripts.dataset download {name} --num-shards {max(2, len(train) + 1)}` "
                            f"to fetch it")
    elif len(val) != 1:
        raise UserError(f"dataset {folder} has {len(val)} val shards in its manifest, not 1: run "
                        f"`{make_command(name)}` to rebuild it")
    if not train:
        raise UserError(f"dataset {folder} has a single shard, need at least 2 (train + val): "
                        f"run `{make_command(name)}` with more shards")
    for entry in shards:
        path = folder / entry["file"]
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry["bytes"]:
            problem = f"is {path.stat().st_size:,} bytes, its manifest says {entry['bytes']:,}"
        elif check_sha256 and file_sha256(path) != entry.get("sha256"):
            problem = "does not match the sha256 in its manifest"
        else:
            continue
        raise UserError(f"shard {path} {problem}: the dataset is damaged; run `{make_command(name)}` to "
                        f"{'fetch it again' if name in PRETRAIN_SOURCES else 'rebuild it'}")
    return [folder / e["file"] for e in train], folder / val[0]["file"]


def open_shard(path, column="text") -> pq.ParquetFile:
    """Open a parquet file and check it has rows (and `column`); UserError naming the file otherwise."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"corrupt parquet file {path} ({e}): delete it and create it again") from None
    if pf.metadata.num_rows == 0 or pf.num_row_groups == 0:
        raise UserError(f"empty parquet file {path} (0 rows): delete it and create it again")
    if column is not None:
        if column not in pf.schema_arrow.names:
            raise UserError(f"parquet file {path} has no `{column}` column (columns: {pf.schema_arrow.names})")
        kind = pf.schema_arrow.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"parquet file {path}: column `{column}` holds {kind}, not text: "
                            "write one document per row as a string")
    return pf


def read_texts(pf, row_group, path):
    """The `text` values of one row group as python strings."""
    try:
        return pf.read_row_group(row_group, columns=["text"]).column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"corrupt parquet file {path}, row group {row_group} ({e}): delete it and create it again") from None


def iter_documents(name, split="train", rank=0, world_size=1, start=None, loop=False):
    """Stream `(text, position)` for the documents of a split, one row group in memory at a time.

    Row groups are dealt to ranks by a global counter over the split's shards (counter % world_size ==
    rank), so DDP ranks read disjoint documents. `position` = {"epoch", "shard", "row_group", "row"};
    `start=position` resumes with the document right after it (same rank and world_size required).
    loop=True cycles over the split forever, counting epochs.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    train, val = list_shards(name)
    paths = train if split == "train" else [val]
    epoch = start["epoch"] if start else 0
    while True:
        resuming = start is not None and epoch == start["epoch"]
        rg_offset = 0  # global row-group counter at the start of the current shard
        owned = 0
        for shard, path in enumerate(paths):
            if resuming and shard < start["shard"]:
                rg_offset += open_shard(path).metadata.num_row_groups
                continue
            pf = open_shard(path)
            num_rg = pf.num_row_groups
            if resuming and shard == start["shard"] and (rg_offset + start["row_group"]) % world_size != rank:
                raise UserError(f"resume position {start} was not read by rank {rank} of {world_size}: "
                                f"resume with the same number of ranks as the checkpoint")
            for row_group in range(num_rg):
                if (rg_offset + row_group) % world_size != rank:
                    continue
                owned += 1
                first_row = 0
                if resuming and shard == start["shard"]:
                    if row_group < start["row_group"]:
                        continue
                    if row_group == start["row_group"]:
                        first_row = start["row"] + 1
                texts = read_texts(pf, row_group, path)
                for row in range(first_row, len(texts)):
                    if texts[row] is not None:
                        yield texts[row], {"epoch": epoch, "shard": shard, "row_group": row_group, "row": row}
            rg_offset += num_rg
            pf.close()
        if not loop:
            return
        if owned == 0 and not resuming:
            raise UserError(f"the {split} split of {dataset_dir(name)} has {rg_offset} row groups, fewer than "
                            f"the {world_size} ranks: make more shards or use fewer ranks")
        epoch += 1


# ---------------------------------------------------------------------------------------------
# writing shards

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir, source, shards, name=None, **extra):
    """manifest.json: where the data came from and, per shard, docs, bytes and sha256 (no timestamps)."""
    manifest = {
        "name": name or Path(out_dir).name,
        "source": source,
        "num_shards": len(shards),
        "num_docs": sum(s["docs"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        **extra,
        "shards": shards,
    }
    atomic_write_text(Path(out_dir) / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


class _ShardFile:
    """One parquet shard being written to a temp name, row group by row group."""

    def __init__(self, tmp_path, row_group_size):
        self.tmp_path = tmp_path
        self.row_group_size = row_group_size
        self.writer = pq.ParquetWriter(tmp_path, SHARD_SCHEMA, **PARQUET_OPTIONS)
        self.rows = []
        self.docs = 0
        self.text_bytes = 0

    def add(self, text):
        self.rows.append(text)
        self.docs += 1
        self.text_bytes += len(text.encode("utf-8"))
        if len(self.rows) == self.row_group_size:
            self._flush()

    def _flush(self):
        if self.rows:
            self.writer.write_table(pa.table({"text": self.rows}, schema=SHARD_SCHEMA), row_group_size=len(self.rows))
            self.rows = []

    def finish(self, path, split):
        """Close, fsync, rename into place; returns the manifest entry."""
        self._flush()
        self.writer.close()
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, path)
        return {"file": path.name, "split": split, "docs": self.docs, "text_bytes": self.text_bytes,
                "bytes": path.stat().st_size, "sha256": file_sha256(path)}

    def abort(self):
        self.writer.close()
        self.tmp_path.unlink(missing_ok=True)


class ShardWriter:
    """Build the dataset folder `out_dir`: documents go into shards of `docs_per_shard` docs in a hidden temp
    folder beside it (`self.folder`), which close() renames into place once manifest.json is written.

    A dataset is therefore complete or absent: a killed build leaves no dataset (a previous build of the same
    name stays readable until the new one replaces it) and the next build removes the dead one's temp folder.
    write(text) adds a train document. write(text, val=True) sends it to a separate validation shard that
    close() places last; if no document was marked val, the last train shard is the val shard. Other files of
    the dataset (the synthetic world's eval bundle) go into `self.folder` before close(). Memory holds one row
    group. `expected_docs` / `expected_text_bytes` size the disk-full message (a projection from what was
    written so far).
    """

    def __init__(self, out_dir, docs_per_shard, row_group_size=1000, source=None, expected_docs=None,
                 expected_text_bytes=None):
        self.out_dir = Path(out_dir)
        self.docs_per_shard = docs_per_shard
        self.row_group_size = row_group_size
        self.source = source or {}
        self.expected = (expected_docs, expected_text_bytes)
        with disk_space(self.out_dir.parent, 1 << 20, f"building dataset {self.out_dir.name}"):
            self.folder = temp_dir_beside(self.out_dir)
        self.entries = []
        self.train = None
        self.val = None

    def write(self, text, val=False):
        if val:
            if self.val is None:
                self.val = _ShardFile(self.folder / ".val.parquet.tmp", self.row_group_size)
            self.val.add(text)
            return
        if self.train is None:
            self.train = _ShardFile(self.folder / f".shard_{len(self.entries):05d}.parquet.tmp", self.row_group_size)
        self.train.add(text)
        if self.train.docs == self.docs_per_shard:
            self._finish_train()

    def _finish_train(self):
        path = self.folder / f"shard_{len(self.entries):05d}.parquet"
        self.entries.append(self.train.finish(path, "train"))
        self.train = None

    def close(self):
        if self.train is not None:
            self._finish_train()
        if self.val is not None:
            path = self.folder / f"shard_{len(self.entries):05d}.parquet"
            self.entries.append(self.val.finish(path, "val"))
            self.val = None
        elif self.entries:
            self.entries[-1]["split"] = "val"
        manifest = write_manifest(self.folder, self.source, self.entries, name=self.out_dir.name,
                                  text_bytes=sum(e["text_bytes"] for e in self.entries))
        replace_dir(self.folder, self.out_dir)
        return manifest

    def needed_bytes(self):
        """An upper bound of the disk the whole dataset takes: its text uncompressed (the input's size when
        known, else what was written so far scaled to the expected documents)."""
        open_files = [f for f in (self.train, self.val) if f is not None]
        docs = sum(e["docs"] for e in self.entries) + sum(f.docs for f in open_files)
        text = sum(e["text_bytes"] for e in self.entries) + sum(f.text_bytes for f in open_files)
        expected_docs, expected_text = self.expected
        if expected_docs and docs:
            text = text * expected_docs / docs
        return int(max(text, expected_text or 0, 1 << 20))

    def abort(self):
        for f in (self.train, self.val):
            if f is not None:
                f.abort()
        self.train = self.val = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()
            except BaseException as e:
                self._abort_after(e)
                raise
        else:
            self._abort_after(exc)
        return False

    def _abort_after(self, exc):
        """Remove the temp folder; a full disk becomes one line with the space the build needs."""
        needed = self.needed_bytes()
        full = isinstance(exc, Exception) and is_disk_full(exc, self.out_dir.parent, needed)
        self.abort()
        if full:
            raise disk_full_error(self.out_dir.parent, needed, f"building dataset {self.out_dir.name}",
                                  bound="up to") from None


# ---------------------------------------------------------------------------------------------
# source: download (FineWeb-Edu / ClimbMix)

def verify_parquet(path, column=None):
    """Download check: the footer reads and the file has rows (and `column` when given)."""
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        raise ValueError("parquet file has 0 rows")
    if column is not None and column not in pf.schema_arrow.names:
        raise ValueError(f"no `{column}` column")


def verify_text_shard(path):
    verify_parquet(path, column="text")


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
    sha = pinned or resolve_revision(repo, revision or "main", **_retry_kwargs(download_kwargs))
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


def _retry_kwargs(download_kwargs):
    return {k: download_kwargs[k] for k in ("retries", "backoff") if k in download_kwargs}


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


# ---------------------------------------------------------------------------------------------
# source: local files

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
    if not name or "/" in name or name.startswith(".") or name in PRETRAIN_SOURCES or name == "synthetic":
        raise UserError(f"--name {name!r}: pick a plain folder name other than {', '.join([*PRETRAIN_SOURCES, 'synthetic'])}")
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


# ---------------------------------------------------------------------------------------------
# chat / SFT data and the CORE eval bundle

# name -> (HF dataset repo, parquet files in it); land in <base>/chat_data/<name>/<path>
CHAT_PARQUETS = {
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", [*(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
                                                 "data/test-00000-of-00001.parquet"]),
    "mmlu": ("cais/mmlu", ["auxiliary_train/train-00000-of-00001.parquet", "all/test-00000-of-00001.parquet"]),
    "gsm8k": ("openai/gsm8k", ["main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"]),
    "arc": ("allenai/ai2_arc", ["ARC-Easy/train-00000-of-00001.parquet", "ARC-Easy/test-00000-of-00001.parquet",
                                "ARC-Challenge/train-00000-of-00001.parquet",
                                "ARC-Challenge/test-00000-of-00001.parquet"]),
    "humaneval": ("openai/openai_humaneval", ["openai_humaneval/test-00000-of-00001.parquet"]),
}
# name -> (env var overriding the URL, default URL, file name); land in <base>/chat_data/<name>/<file>
CHAT_URLS = {
    "identity": ("NANOPIPE_IDENTITY_URL",
                 "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
                 "identity_conversations.jsonl"),
    "words": ("NANOPIPE_WORDS_URL",
              "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt",
              "words_alpha.txt"),
}
CHAT_DATA_NAMES = [*CHAT_PARQUETS, *CHAT_URLS]
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def chat_data_dir() -> Path:
    return get_base_dir() / "chat_data"


def chat_data_file(name, path):
    """Path of a downloaded chat-data file (e.g. ("gsm8k", "main/test-00000-of-00001.parquet")); UserError if absent."""
    p = chat_data_dir() / name / path
    if not p.exists():
        raise UserError(f"missing {p}: run `python -m scripts.dataset chat-data --only {name}`")
    return p


def verify_jsonl(path):
    with open(path, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip() and json.loads(line) is not None)
    if rows == 0:
        raise ValueError("no JSON lines")


def verify_nonempty_text(path):
    with open(path, encoding="utf-8") as f:
        if not f.read(4096).strip():
            raise ValueError("empty text file")


def chat_data_revision(name, repo, **retry_kwargs) -> str:
    """The commit of `repo` this chat dataset is pinned to: the one recorded at its first download, else main's
    commit now (recorded in chat_data/<name>/source.json once a file of it has landed)."""
    recorded = chat_data_dir() / name / "source.json"
    if recorded.is_file():
        source = json.loads(recorded.read_text())
        if source.get("repo") == repo and source.get("revision"):
            return source["revision"]
    return resolve_revision(repo, "main", **retry_kwargs)


def chat_data_jobs(names, **retry_kwargs):
    jobs = []
    for name in names:
        if name in CHAT_PARQUETS:
            repo, files = CHAT_PARQUETS[name]
            sha = chat_data_revision(name, repo, **retry_kwargs)
            jobs += [DownloadJob(hub.url, chat_data_dir() / name / f, verify_parquet, hub=hub)
                     for f, hub in ((f, HubFile(repo, f, sha)) for f in files)]
        else:
            env, url, filename = CHAT_URLS[name]
            verify = verify_jsonl if filename.endswith(".jsonl") else verify_nonempty_text
            jobs.append(DownloadJob(os.environ.get(env) or url, chat_data_dir() / name / filename, verify))
    return jobs


def download_chat_data(names=None, workers=4, **download_kwargs):
    names = names or CHAT_DATA_NAMES
    unknown = [n for n in names if n not in CHAT_DATA_NAMES]
    if unknown:
        raise UserError(f"--only {','.join(unknown)}: unknown; choose from {','.join(CHAT_DATA_NAMES)}")
    jobs = chat_data_jobs(names, **_retry_kwargs(download_kwargs))
    summary = download_many(jobs, workers=workers, **download_kwargs)
    for job in jobs:  # pin each hub dataset to the commit its files came from
        recorded = chat_data_dir() / job.dest.relative_to(chat_data_dir()).parts[0] / "source.json"
        if job.hub is not None and job.dest.exists() and not recorded.exists():
            atomic_write_text(recorded, json.dumps({"repo": job.hub.repo_id, "revision": job.hub.revision}) + "\n")
    print(summary.format())
    return summary


def verify_zip(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"bad CRC for {bad}")


def download_eval_bundle(**download_kwargs):
    """Fetch and unpack the CORE eval bundle into <base>/eval_bundle/ (core.yaml, eval_meta_data.csv, eval_data/)."""
    base = get_base_dir()
    out = base / "eval_bundle"
    if (out / "core.yaml").exists():
        print(f"{out} already present")
        return out
    url = os.environ.get("NANOPIPE_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    zip_path = base / "eval_bundle.zip"
    download_file(url, zip_path, verify=verify_zip, **download_kwargs)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".eval_bundle."))
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)  # zipfile drops absolute and ".." path parts
        roots = sorted(p.parent for p in tmp.rglob("core.yaml") if "__MACOSX" not in p.parts)
        if not roots:
            zip_path.unlink()
            raise UserError(f"{url} holds no core.yaml: not a CORE eval bundle")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier bundle (it had no core.yaml)
        os.replace(roots[0], out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink()
    print(f"wrote {out}")
    return out


def get_eval_bundle_dir(data_name) -> Path:
    """Where the CORE bundle is: $NANOPIPE_EVAL_BUNDLE, the synthetic world's own, or the downloaded one."""
    if os.environ.get("NANOPIPE_EVAL_BUNDLE"):
        path = Path(os.environ["NANOPIPE_EVAL_BUNDLE"]).expanduser()
        fix = "point NANOPIPE_EVAL_BUNDLE at a folder with core.yaml, eval_meta_data.csv and eval_data/"
    elif data_name == "synthetic":
        path = dataset_dir("synthetic") / "eval_bundle"
        fix = "run `python -m scripts.dataset synthetic`"
    else:
        path = get_base_dir() / "eval_bundle"
        fix = "run `python -m scripts.dataset eval-bundle` (or set NANOPIPE_EVAL_BUNDLE)"
    if not (path / "core.yaml").exists():
        raise UserError(f"no CORE eval bundle in {path}: {fix}")
    return path


if __name__ == "__main__":
    # the CLI moved up to scripts/ (it builds the synthetic world, which lives in tasks/world/)
    print("error: `python -m nanopipe.dataset` moved: run `python -m scripts.dataset " + " ".join(sys.argv[1:])
          + "` instead", file=sys.stderr)
    sys.exit(2)
