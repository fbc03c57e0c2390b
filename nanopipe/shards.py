"""Parquet shard datasets, read side: the folder layout, the manifest, and streaming documents from shards.

A dataset is `<base>/data/<name>/shard_NNNNN.parquet` (one `text` column, one document per row, row groups
of ~1000 docs) plus `manifest.json`. The LAST shard (sorted by name) is validation, all others are train.
A dataset is readable only once its manifest is written (shard_writer.py and sources.py write them).
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanopipe.common import UserError, file_sha256, get_base_dir

# name -> (HF dataset repo, index of its last shard)
PRETRAIN_SOURCES = {
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822),
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542),
}
# datasets a command of their own builds; every other name is built by `local`
BUILD_COMMANDS = {**{name: f"python -m scripts.dataset download {name} --num-shards 8" for name in PRETRAIN_SOURCES},
                  "synthetic": "python -m scripts.dataset synthetic"}


def dataset_dir(name) -> Path:
    return get_base_dir() / "data" / name


def make_command(name):
    """The command that creates dataset `name`, for error messages."""
    return BUILD_COMMANDS.get(name, f"python -m scripts.dataset local --name {name} PATH...")


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


def parquet_file(path, column=None) -> pq.ParquetFile:
    """`path` opened as parquet; ValueError naming the file unless it has rows (and a text column `column`)."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"corrupt parquet file {path} ({e}): delete it and create it again") from None
    if pf.metadata.num_rows == 0 or pf.num_row_groups == 0:
        raise ValueError(f"empty parquet file {path} (0 rows): delete it and create it again")
    if column is not None:
        if column not in pf.schema_arrow.names:
            raise ValueError(f"parquet file {path} has no `{column}` column (columns: {pf.schema_arrow.names})")
        kind = pf.schema_arrow.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"parquet file {path}: column `{column}` holds {kind}, not text: "
                             "write one document per row as a string")
    return pf


def verify_parquet(path, column=None):
    """Download check (a DownloadJob's verify): parquet_file's checks, the file closed again."""
    parquet_file(path, column).close()


def verify_text_shard(path):
    verify_parquet(path, column="text")


def open_shard(path, column="text") -> pq.ParquetFile:
    """parquet_file's checks as a UserError, for files a stage reads."""
    try:
        return parquet_file(path, column)
    except ValueError as e:
        raise UserError(str(e)) from None


def read_texts(pf, row_group, path):
    """The `text` values of one row group as python strings."""
    try:
        return pf.read_row_group(row_group, columns=["text"]).column(0).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"corrupt parquet file {path}, row group {row_group} ({e}): delete it and create it "
                        "again") from None


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

