"""Parquet shard datasets: writing, streaming reads, rank striding, exact resume, local files, synthetic."""

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanopipe import shard_writer, shards, sources
from nanopipe.common import UserError
from scripts import dataset
from tasks.world.documents import generate_documents
from tasks.world.source import DOCS_PER_SHARD
from tasks.profile import data_profile, default_data_name
from tests.conftest import subprocess_env


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOPIPE_DATA", raising=False)
    return tmp_path / "base"


def doc(i):
    return f"doc {i}: " + "word " * (i % 17)


def make_dataset(name, num_docs, docs_per_shard, row_group_size):
    with shard_writer.ShardWriter(shards.dataset_dir(name), docs_per_shard, row_group_size) as w:
        for i in range(num_docs):
            w.write(doc(i))


def test_shard_writer_layout_and_manifest(base):
    make_dataset("toy", 2500, 1000, 300)
    out = base / "data" / "toy"
    train, val = shards.list_shards("toy")
    assert [p.name for p in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert val.name == "shard_00002.parquet"
    assert [pq.ParquetFile(p).metadata.num_rows for p in (*train, val)] == [1000, 1000, 500]
    assert [pq.ParquetFile(p).metadata.row_group(0).num_rows for p in (*train, val)] == [300, 300, 300]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_docs"] == 2500 and [s["split"] for s in manifest["shards"]] == ["train", "train", "val"]
    assert manifest["text_bytes"] == sum(len(doc(i).encode()) for i in range(2500))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard_0000{i}.parquet" for i in range(3)]
    # rebuilding with fewer docs leaves no stale shard behind to be mistaken for the val shard
    make_dataset("toy", 1500, 1000, 300)
    assert [p.name for p in shards.list_shards("toy")[0]] == ["shard_00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.parquet", "shard_00001.parquet"]


def test_iter_documents_reads_everything_in_order(base):
    make_dataset("toy", 2500, 1000, 300)
    texts = [t for t, _ in shards.iter_documents("toy", "train")]
    assert texts == [doc(i) for i in range(2000)]
    assert [t for t, _ in shards.iter_documents("toy", "val")] == [doc(i) for i in range(2000, 2500)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_row_groups_covering_the_split(base, world_size):
    make_dataset("toy", 2500, 1000, 300)  # 4 row groups per train shard: 8 in all, counted globally
    per_rank = [list(shards.iter_documents("toy", "train", rank, world_size)) for rank in range(world_size)]
    texts = [[t for t, _ in docs] for docs in per_rank]
    assert sorted(sum(texts, [])) == sorted(doc(i) for i in range(2000))  # disjoint and complete
    for rank, docs in enumerate(per_rank):
        global_rgs = {p["shard"] * 4 + p["row_group"] for _, p in docs}
        assert global_rgs and all(g % world_size == rank for g in global_rgs)


def test_exact_resume_from_any_position_across_epochs(base):
    make_dataset("toy", 2500, 1000, 300)
    stream = shards.iter_documents("toy", "train", rank=1, world_size=2, loop=True)
    reference = [next(stream) for _ in range(2500)]  # rank 1 has 800 docs per epoch: spans 4 epochs
    assert {p["epoch"] for _, p in reference} == {0, 1, 2, 3}
    for cut in [0, 1, 299, 300, 399, 799, 800, 1733]:
        resumed = shards.iter_documents("toy", "train", rank=1, world_size=2, start=reference[cut][1], loop=True)
        assert [next(resumed) for _ in range(2500 - cut - 1)] == reference[cut + 1:]
    with pytest.raises(UserError, match="same number of ranks"):
        next(shards.iter_documents("toy", "train", rank=0, world_size=2, start=reference[5][1]))
    # without loop, resuming at the last document of the split yields nothing more
    last = list(shards.iter_documents("toy", "train", rank=1, world_size=2))[-1][1]
    assert list(shards.iter_documents("toy", "train", rank=1, world_size=2, start=last)) == []


def test_missing_corrupt_and_empty_shards_are_user_errors(base):
    with pytest.raises(UserError, match="python -m scripts.dataset download fineweb-edu"):
        shards.list_shards("fineweb-edu")
    with pytest.raises(UserError, match="python -m scripts.dataset synthetic"):
        shards.iter_documents("synthetic").__next__()
    make_dataset("toy", 2500, 1000, 300)
    folder = base / "data" / "toy"
    corrupt = folder / "shard_00001.parquet"
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[:-100])  # lost its footer: the size no longer matches the manifest
    with pytest.raises(UserError, match=f"shard {corrupt} is [0-9,]+ bytes, its manifest says [0-9,]+: .* rebuild it"):
        list(shards.iter_documents("toy", "train"))
    # the same size but other bytes: only the sha256 check (on demand) sees it
    corrupt.write_bytes(good[:100] + bytes(100) + good[200:])
    assert shards.list_shards("toy")[1].name == "shard_00002.parquet"
    with pytest.raises(UserError, match=f"shard {corrupt} does not match the sha256"):
        shards.list_shards("toy", check_sha256=True)
    assert dataset.main(["verify", "toy"]) == 2
    corrupt.write_bytes(good)
    assert dataset.main(["verify", "toy"]) == 0
    # a bad parquet file (e.g. a local input) is still named by open_shard
    bad = base / "bad.parquet"
    bad.write_bytes(good[:-100])
    with pytest.raises(UserError, match=f"corrupt parquet file {bad}"):
        shards.open_shard(bad)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), bad)
    with pytest.raises(UserError, match=f"empty parquet file {bad}"):
        shards.open_shard(bad)
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(UserError, match=f"{bad} has no `text` column"):
        shards.open_shard(bad)


def test_a_dataset_is_read_only_through_its_manifest(base):
    make_dataset("toy", 2500, 1000, 300)
    folder = base / "data" / "toy"
    assert not list(folder.parent.glob(".toy.*"))  # the build's temp folder was renamed into place
    # a rebuild that dies halfway leaves the previous dataset as it was, and its temp folder is cleaned up later
    with pytest.raises(RuntimeError):
        with shard_writer.ShardWriter(folder, 1000, 300) as w:
            for i in range(1500):
                w.write("new " + doc(i))
            raise RuntimeError("killed")
    assert [t for t, _ in shards.iter_documents("toy", "val")] == [doc(i) for i in range(2000, 2500)]
    assert not list(folder.parent.glob(".toy.*"))
    # shards that the manifest does not list (a download still running) are not read
    (folder / "shard_00005.parquet").write_bytes((folder / "shard_00000.parquet").read_bytes())
    assert len(shards.list_shards("toy")[0]) == 2
    # a dataset without its manifest (an interrupted build of an older nanopipe) is refused with the rebuild
    (folder / "manifest.json").unlink()
    with pytest.raises(UserError, match="shards but no manifest.json.*`python -m scripts.dataset local --name toy"):
        shards.list_shards("toy")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=f"unreadable manifest {folder / 'manifest.json'}"):
        shards.list_shards("toy")


def test_a_download_without_its_val_shard_is_refused_with_the_download_command(base):
    """An older nanopipe marked the last train shard as val when the source's final shard failed: refuse it."""
    folder = base / "data" / "fineweb-edu"
    folder.mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"text": [doc(j) for j in range(10)]}), folder / f"shard_{i:05d}.parquet")
    sources.update_download_manifest(folder, {"kind": "download"}, "shard_01822.parquet")
    with pytest.raises(UserError, match="lacks its val shard shard_01822.parquet: run `python -m scripts.dataset "
                                        "download fineweb-edu --num-shards 4`"):
        shards.list_shards("fineweb-edu")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][-1]["split"] = "val"  # what the old manifest said
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lacks its val shard shard_01822.parquet"):
        shards.list_shards("fineweb-edu")


def test_default_data_name(monkeypatch):
    monkeypatch.delenv("NANOPIPE_DATA", raising=False)
    assert default_data_name() == "fineweb-edu"
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    assert default_data_name() == "synthetic"
    assert default_data_name("mine") == "mine"


def write_local_sources(root):
    books = root / "books"
    (books / "sub").mkdir(parents=True)
    for i in range(30):
        (books / "sub" / f"b{i:02d}.txt").write_text(f"book {i}\n\nsecond paragraph of book {i}\n")
    (books / "notes.md").write_text("# notes\n\nmarkdown is one document too\n")
    (books / "ignored.bin").write_bytes(b"\x00")
    (books / "empty.txt").write_text("  \n")
    web = root / "web.jsonl"
    web.write_text("".join(json.dumps({"text": f"web {i}", "url": "u"}) + "\n" for i in range(300)))
    pq.write_table(pa.table({"text": [f"pq {i}" for i in range(500)]}), root / "more.parquet", row_group_size=64)
    return [books, web, root / "more.parquet"]


def all_texts(name):
    train, val = shards.list_shards(name)
    return [t for t, _ in shards.iter_documents(name, "train")], [t for t, _ in shards.iter_documents(name, "val")]


def test_local_reads_txt_md_jsonl_parquet(base, tmp_path):
    paths = write_local_sources(tmp_path / "src")
    assert dataset.main(["local", "--name", "mine", *map(str, paths), "--docs-per-shard", "200",
                         "--val-every", "10"]) == 0
    train, val = all_texts("mine")
    expected = ["# notes\n\nmarkdown is one document too\n"] + [f"book {i}\n\nsecond paragraph of book {i}\n"
                                                                 for i in range(30)]
    expected += [f"web {i}" for i in range(300)] + [f"pq {i}" for i in range(500)]
    assert val == expected[::10]  # every 10th document, starting with the first
    assert train == [t for i, t in enumerate(expected) if i % 10]
    assert len(shards.list_shards("mine")[0]) == 4  # 748 train docs / 200 per shard


def test_local_weighted_mix_is_deterministic(base, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(5000)))
    b.write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(2000)))
    sources.build_local("mix", [a, b], weights=[3, 1], seed=7, docs_per_shard=1000)
    train, val = all_texts("mix")
    docs = train + val
    share_a = sum(t.startswith("a") for t in docs) / len(docs)
    assert 0.72 < share_a < 0.78  # 3:1
    assert len(docs) > 5000 and docs.count("a0") == 1  # stopped when a ran dry, no repeats
    a_docs = [t for t in train if t.startswith("a")]
    assert a_docs == sorted(a_docs, key=lambda t: int(t[1:]))  # each source keeps its order
    first = {p.name: p.read_bytes() for p in (base / "data" / "mix").iterdir()}
    sources.build_local("mix", [a, b], weights=[3, 1], seed=7, docs_per_shard=1000)
    assert {p.name: p.read_bytes() for p in (base / "data" / "mix").iterdir()} == first  # byte-identical
    sources.build_local("mix", [a, b], weights=[3, 1], seed=8, docs_per_shard=1000)
    assert (base / "data" / "mix" / "shard_00000.parquet").read_bytes() != first["shard_00000.parquet"]


def test_local_input_errors(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    with pytest.raises(UserError, match=f"{bad}:2"):
        sources.build_local("bad", [bad])
    with pytest.raises(UserError, match="one weight per path"):
        sources.build_local("bad", [bad], weights=[1, 2])
    with pytest.raises(UserError, match="no such file"):
        sources.build_local("bad", [tmp_path / "nope.txt"])
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(UserError, match="need at least 2"):
        sources.build_local("bad", [one])
    assert dataset.main(["local", "--name", "synthetic", str(one)]) == 2


def test_synthetic_is_deterministic_and_skips_when_built(base, capsys):
    assert dataset.main(["synthetic", "--num-shards", "2", "--seed", "3"]) == 0
    out = base / "data" / "synthetic"
    first = {p.name: p.read_bytes() for p in out.glob("*.*")}
    assert sorted(first) == ["manifest.json", "shard_00000.parquet", "shard_00001.parquet"]
    assert (out / "eval_bundle" / "core.yaml").exists()
    assert data_profile("synthetic").eval_bundle_dir() == out / "eval_bundle"
    assert dataset.main(["synthetic", "--num-shards", "2", "--seed", "3"]) == 0
    assert "already holds" in capsys.readouterr().out
    assert dataset.main(["synthetic", "--num-shards", "2", "--seed", "3", "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.*")} == first
    texts = [t for t, _ in shards.iter_documents("synthetic", "train")]
    assert texts == list(generate_documents(3, DOCS_PER_SHARD))


@pytest.mark.slow
def test_streaming_memory_stays_flat(tmp_path):
    """Build a ~200 MB corpus from local files and stream it back: RSS stops growing after the first row groups."""
    script = textwrap.dedent(f"""
        import json, resource
        from pathlib import Path
        from nanopipe import shards, sources
        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        src = Path({str(tmp_path / "src.jsonl")!r})
        block = "".join(chr(97 + (i * 7) % 26) for i in range(4000))
        with open(src, "w") as f:  # 50k docs x 4 KB = 200 MB of text
            for i in range(50_000):
                f.write(json.dumps({{"text": f"{{i}} " + block}}) + "\\n")
        before = peak_mb()
        sources.build_local("big", [src], docs_per_shard=10_000, val_every=1000)
        n = chars = 0
        for text, pos in shards.iter_documents("big", "train"):
            n += 1
            chars += len(text)
            if n == 3000:
                early = peak_mb()
        print(json.dumps({{"docs": n, "chars": chars, "before": before, "early": early, "peak": peak_mb()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env=subprocess_env(), cwd=tmp_path)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["docs"] == 49_950 and stats["chars"] > 190e6
    assert stats["peak"] - stats["before"] < 100  # MB, for a 200 MB corpus written and read back
    assert stats["peak"] - stats["early"] < 20  # flat: reading 47k more documents adds (almost) nothing
