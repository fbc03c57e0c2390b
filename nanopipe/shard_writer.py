"""Parquet shard datasets, write side: ShardWriter builds a dataset folder atomically, write_manifest records it."""

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanopipe.common import (atomic_write_text, disk_full_error, disk_space, file_sha256, is_disk_full, replace_dir,
                             temp_dir_beside)

SHARD_SCHEMA = pa.schema([("text", pa.string())])
# fixed codec and level so the same documents always give the same bytes
PARQUET_OPTIONS = dict(compression="zstd", compression_level=3)


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

