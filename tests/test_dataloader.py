"""PretrainLoader on a real (tiny) dataset and a real trained tokenizer: packing, exact resume, DDP split."""

import io
import random

import pytest
import torch

from nanopipe import shard_writer, shards
from nanopipe.dataloader import PretrainLoader
from nanopipe.tokenizer import Tokenizer

B, T = 4, 48


def make_docs(n, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud seven green quick brown fox jumps".split()
    # lengths from a few tokens to more than a row, so both whole placement and cropping happen
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 20, 40, 90])))
            for i in range(n)]


@pytest.fixture
def setup(isolated_dirs):
    docs = make_docs(1300)
    with shard_writer.ShardWriter(shards.dataset_dir("toy"), docs_per_shard=500, row_group_size=50) as w:
        for text in docs:
            w.write(text)
    tokenizer = Tokenizer.train(iter(docs[:400]), vocab_size=300)
    encoded = tokenizer.encode(docs, prepend=tokenizer.bos_token_id)
    return tokenizer, {tuple(ids): text for ids, text in zip(encoded, docs)}


def segments(row, bos):
    """Split a row at its BOS tokens: each piece is one document (whole, or cropped if it is the last)."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def collect(loader, num_batches):
    return [next(loader) for _ in range(num_batches)]


def test_rows_are_bos_aligned_whole_documents_without_padding(setup):
    tokenizer, doc_of = setup
    bos = tokenizer.bos_token_id
    loader = PretrainLoader(tokenizer, "toy", "train", B, T, buffer_docs=64, tokenizer_batch=16)
    cropped = 0
    for x, y in collect(loader, 20):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert row[0] == bos
            pieces = segments(row, bos)
            assert sum(map(len, pieces)) == T + 1  # every token belongs to a document: no padding
            assert all(p in doc_of for p in pieces[:-1])  # all but the last are whole documents
            last = pieces[-1]
            if last not in doc_of:  # the last may be cropped: a prefix of a longer document
                cropped += 1
                assert any(len(d) > len(last) and d[:len(last)] == last for d in doc_of)
    assert cropped > 0


def test_best_fit_prefers_the_largest_document_that_fits(setup):
    tokenizer, doc_of = setup
    bos = tokenizer.bos_token_id
    loader = PretrainLoader(tokenizer, "toy", "train", 1, T, buffer_docs=64, tokenizer_batch=16)
    loader._refill()
    buffered = sorted(len(d) for d in loader.docs)
    x, y = next(loader)
    first = segments(torch.cat([x[0], y[0, -1:]]).tolist(), bos)[0]
    assert len(first) == max(n for n in buffered if n <= T + 1)


def test_resume_gives_bitwise_identical_batches(setup):
    tokenizer, _ = setup
    kwargs = dict(buffer_docs=40, tokenizer_batch=16)
    reference = PretrainLoader(tokenizer, "toy", "train", B, T, **kwargs)
    collect(reference, 7)
    state = reference.state_dict()
    expected = collect(reference, 400)  # far enough to wrap into the next epoch
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = PretrainLoader(tokenizer, "toy", "train", B, T, state=state, **kwargs)
    assert resumed.position["epoch"] == 0 and reference.position["epoch"] >= 1
    for (x0, y0), (x1, y1) in zip(expected, collect(resumed, 400)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_ddp_ranks_see_disjoint_documents(setup):
    tokenizer, doc_of = setup
    bos = tokenizer.bos_token_id
    seen = []
    for rank in range(2):
        loader = PretrainLoader(tokenizer, "toy", "train", B, T, rank=rank, world_size=2, buffer_docs=32,
                                tokenizer_batch=16)
        docs = set()
        for x, y in collect(loader, 12):
            for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
                docs.update(doc_of[p] for p in segments(row, bos) if p in doc_of)
        assert loader.position["epoch"] == 0
        seen.append(docs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # row groups of 50 docs alternate between the ranks
    assert all(int(d.split(":")[0][4:]) // 50 % 2 == 0 for d in seen[0])


def test_val_split_is_finite(setup):
    tokenizer, _ = setup
    batches = list(PretrainLoader(tokenizer, "toy", "val", B, T, buffer_docs=32, tokenizer_batch=16))
    assert 0 < len(batches) < 300  # 300 val docs; the loader stops instead of looping
