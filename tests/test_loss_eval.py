import math

import pytest
import torch
import torch.nn.functional as F

from nanopipe.common import UserError
from nanopipe.loss_eval import evaluate_bpb, evaluate_text, text_windows
from tasks.world.documents import generate_documents
from tests.conftest import noisy_gpt


def uniform_model(tokenizer, seq_len=32):
    """All logits 0 (a zero lm_head): the loss is ln(V) on every token."""
    model = noisy_gpt(tokenizer, seq_len, n_layer=1, noise=0.0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def batches_from(tokenizer, texts, seq_len):
    """(x, y) batches of 2 rows; some targets are special tokens (0 bytes) and some are ignored (-1)."""
    bos = tokenizer.bos_token_id
    ids = [t for text in texts for t in tokenizer.encode(text, prepend=bos)]
    rows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - seq_len - 1, seq_len)]
    out = []
    for r in range(0, len(rows) - 1, 2):
        block = torch.tensor(rows[r:r + 2])
        x, y = block[:, :-1], block[:, 1:].clone()
        y[0, :3] = -1
        out.append((x, y))
    return out


def test_bpb_uniform_logits_is_log2_vocab_over_bytes_per_token(tokenizer):
    model = uniform_model(tokenizer)
    token_bytes = tokenizer.token_bytes()
    batches = batches_from(tokenizer, list(generate_documents(1, 6)), 32)
    ys = torch.cat([y.flatten() for _, y in batches])
    counted = ys[ys >= 0]
    nbytes = token_bytes[counted]
    assert (nbytes == 0).any()                    # bos targets are in there, and must not count
    n_counted = int((nbytes > 0).sum())
    expected = math.log2(tokenizer.vocab_size) * n_counted / int(nbytes.sum())
    assert evaluate_bpb(model, batches, len(batches), token_bytes) == pytest.approx(expected, rel=1e-6)


def test_bpb_matches_hand_computation(tokenizer):
    model = noisy_gpt(tokenizer, seq_len=32, n_layer=1)
    token_bytes = tokenizer.token_bytes()
    batches = batches_from(tokenizer, list(generate_documents(2, 6)), 32)
    nats = nbytes = 0.0
    with torch.no_grad():
        for x, y in batches[:3]:
            logp = F.log_softmax(model(x), dim=-1)
            for b in range(y.size(0)):
                for t in range(y.size(1)):
                    target = int(y[b, t])
                    if target >= 0 and token_bytes[target] > 0:
                        nats -= float(logp[b, t, target])
                        nbytes += int(token_bytes[target])
    got = evaluate_bpb(model, iter(batches), 3, token_bytes)
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert model.training is False
    # a loader that runs out early: only the batches it has are used
    assert evaluate_bpb(model, batches[:3], 100, token_bytes) == pytest.approx(got, rel=1e-9)


def test_text_windows_cover_every_target_once():
    ids = list(range(10))
    windows = list(text_windows(ids, 4))
    assert windows == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]), ([8, 0, 0, 0], [9, -1, -1, -1])]
    targets = [t for _, y in windows for t in y if t != -1]
    assert targets == ids[1:]


def test_evaluate_text_uniform_model(tokenizer, tmp_path):
    model = uniform_model(tokenizer, seq_len=16)
    texts = {"a.txt": "The capital of Quen is Lorv.\nIt is a fine city.", "b.md": "héllo wörld, 12 + 30 = 42 ✓"}
    paths = []
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        paths.append(tmp_path / name)
    result = evaluate_text(model, tokenizer, paths, batch_size=2)
    V = tokenizer.vocab_size
    tokens = sum(len(tokenizer.encode(t)) for t in texts.values())
    nbytes = sum(len(t.encode("utf-8")) for t in texts.values())
    assert list(result)[0] == "bpb"
    assert result["tokens"] == tokens and result["bytes"] == nbytes
    assert result["loss_per_token"] == pytest.approx(math.log(V), rel=1e-6)
    assert result["perplexity"] == pytest.approx(V, rel=1e-5)
    assert result["bpb"] == pytest.approx(math.log2(V) * tokens / nbytes, rel=1e-6)
    assert set(result["files"]) == {str(p) for p in paths}
    b = result["files"][str(tmp_path / "b.md")]
    assert b["bytes"] == len(texts["b.md"].encode("utf-8"))


def test_evaluate_text_missing_file(tokenizer, tmp_path):
    model = uniform_model(tokenizer)
    with pytest.raises(UserError, match="no text file"):
        evaluate_text(model, tokenizer, [tmp_path / "nope.txt"])
