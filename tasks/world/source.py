"""The `synthetic` data source: data/synthetic/ built from the world (prose shards, CORE bundle, chat files).

    python -m scripts.dataset synthetic [--num-shards 6] [--seed 0]
"""

from pathlib import Path

from nanopipe.common import UserError
from nanopipe.shard_writer import ShardWriter
from nanopipe.shards import dataset_dir, read_manifest
from tasks.world.chat import chat_datasets
from tasks.world.core import write_core_bundle, write_jsonl
from tasks.world.documents import generate_documents
from tasks.world.facts import build_world

DOCS_PER_SHARD = 2000
DEFAULT_NUM_SHARDS = 6          # 5 train + 1 validation


def build_synthetic(num_shards=None, seed=0, force=False):
    """data/synthetic/: num_shards shards of the synthetic world's prose, plus its eval bundle and chat data.

    Skipped when the folder already holds the same seed and shard count (the run script can call it always).
    """
    num_shards = num_shards or DEFAULT_NUM_SHARDS
    out = dataset_dir("synthetic")
    source = {"kind": "synthetic", "seed": seed, "docs_per_shard": DOCS_PER_SHARD}
    manifest = read_manifest(out)
    if (not force and manifest and manifest["source"] == source and manifest["num_shards"] == num_shards
            and all((out / s["file"]).exists() for s in manifest["shards"]) and (out / "eval_bundle").is_dir()):
        print(f"{out} already holds synthetic seed {seed} with {num_shards} shards")
        return out
    if num_shards < 2:
        raise UserError(f"--num-shards {num_shards}: need at least 2 (train + val)")
    num_docs = num_shards * DOCS_PER_SHARD
    with ShardWriter(out, DOCS_PER_SHARD, source=source, expected_docs=num_docs) as writer:
        for text in generate_documents(seed, num_docs):
            writer.write(text)
        write_extras(seed, writer.folder)
    print(f"wrote {out}")
    return out


def write_extras(seed: int, out_dir: Path) -> None:
    """Write the world's CORE bundle (out_dir/eval_bundle/) and chat data (out_dir/chat/)."""
    out_dir = Path(out_dir)
    world = build_world(seed)
    write_core_bundle(seed, world, out_dir / "eval_bundle")
    for stem, rows in chat_datasets(seed, world).items():
        write_jsonl(out_dir / "chat" / f"{stem}.jsonl", rows)
