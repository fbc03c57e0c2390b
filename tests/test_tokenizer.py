"""The tokenizer: exact BPE training through chunk counting, lossless encoding, special tokens, chat rendering and
masks, saving/loading, and the tok_train / tok_eval stages end to end."""

import argparse
import difflib
import inspect
import json
import textwrap
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers, trainers

from nanopipe import tokenizer as tokenizer_module
from nanopipe.common import UserError, get_base_dir
from nanopipe.tokenizer import (CHUNK_BOUNDARY, SPECIAL_TOKENS, Tokenizer, _new_hf_tokenizer, chunk_feed,
                                count_chunks_into, get_tokenizer, sample_chunks, trainer_feed)
from tests.conftest import SHARED

SHARED_DATA = SHARED / "data"

# Text in several scripts, so that some learned tokens hold only part of a UTF-8 character.
MULTILINGUAL = [
    "Die kleine Katze schläft gern auf dem warmen Fensterbrett, während draußen der Regen fällt.",
    "Le boulanger ouvre très tôt, et l'odeur du pain chaud remplit toute la rue.",
    "Mañana iremos al mercado para comprar naranjas, pan y un poco de queso.",
    "Зимой в деревне тихо, и только снег скрипит под ногами.",
    "我们明天早上去公园散步，然后一起吃早饭。我们喜欢公园。",
    "駅の近くに新しい本屋ができたので、週末に行ってみます。",
    "오늘은 날씨가 맑아서 산책하기 좋습니다.",
    "Great job 🎉👍 see you soon 🚀 — “quoted” text… 3×4=12, 10°C",
]


def corpus():
    """~250 KB of real text available offline: Python stdlib sources (prose docstrings + code) and sentences in
    several languages, as documents of a few KB."""
    docs = []
    for module in (argparse, textwrap, difflib, json.decoder, json.encoder, inspect):
        source = inspect.getsource(module)
        docs.extend(source[i:i + 3000] for i in range(0, len(source), 3000))
    for i in range(60):
        docs.append(" ".join(MULTILINGUAL[(i + j) % len(MULTILINGUAL)] for j in range(4)) + f" ({i})")
    return docs


@pytest.fixture(scope="module")
def docs():
    return corpus()


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(iter(docs), vocab_size=1000)


def gpt2_byte_alphabet() -> dict[str, int]:
    """byte-level char -> byte (the GPT-2 table), written out independently of the code under test."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def token_raw_bytes(tok, token_id) -> bytes:
    table = gpt2_byte_alphabet()
    return bytes(table[c] for c in tok.id_to_token(token_id))


# ---------------------------------------------------------------------------------------------
# training

def test_vocab_layout(tok):
    assert tok.vocab_size == 1000
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1000 - 9, 1000))
    assert tok.bos_token_id == tok.encode_special("<|bos|>") == 991
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_chunk_training_is_exact_bpe(docs):
    """Below two million chunks every chunk is fed (k = 1): the result equals the plain HF trainer on the raw text."""
    ours = Tokenizer.train(iter(docs), vocab_size=1200)
    plain = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=1200 - 9, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    plain.train_from_iterator(docs, trainer)
    assert json.loads(ours._hf.to_str())["model"] == json.loads(plain.to_str())["model"]


def test_training_is_deterministic(docs, tok):
    again = Tokenizer.train(iter(docs), vocab_size=1000)
    assert again._hf.to_str() == tok._hf.to_str()


# whitespace of every kind (incl. \x1c, which only Python calls a space) next to letters, digits and punctuation
chunk_text = st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2009\u3000aZé中1'.,-(")), max_size=40) \
    | st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(chunk_text)
def test_chunks_never_split_a_pretoken(tok, text):
    """The pre-tokens of a text are the pre-tokens of its chunks (cuts before a space followed by non-space)."""
    pretokenize = tok._hf.pre_tokenizer.pre_tokenize_str
    pieces = CHUNK_BOUNDARY.split(text)
    chunks = [pieces[0]] + [" " + p for p in pieces[1:]]
    assert "".join(chunks) == text
    assert [w for w, _ in pretokenize(text)] == [w for c in chunks for w, _ in pretokenize(c)]


def test_feed_does_not_depend_on_the_number_of_processes(docs):
    serial_stats, parallel_stats = {}, {}
    serial = chunk_feed(iter(docs), num_workers=1, batch_chars=20_000, stats=serial_stats)
    parallel = chunk_feed(iter(docs), num_workers=3, batch_chars=20_000, stats=parallel_stats)
    assert parallel == serial and parallel_stats == serial_stats and serial_stats["feed_scale"] == 1
    assert sorted("".join(serial)) == sorted("".join(docs))  # k = 1: every character fed exactly once


def test_errors_in_counting_processes_reach_the_caller(docs, monkeypatch):
    def failing_count(texts, body, heads):
        if any("BOOM" in t for t in texts):
            raise ValueError("boom")
        count_chunks_into(texts, body, heads)

    monkeypatch.setattr(tokenizer_module, "count_chunks_into", failing_count)  # the forked helpers inherit it
    with pytest.raises(ValueError, match="boom"):
        chunk_feed(iter(docs + ["BOOM"] + docs), num_workers=2, batch_chars=20_000)
    with pytest.raises(TypeError, match="must be str"):  # a bad text from the iterator, read by this process
        chunk_feed(iter(docs + [None]), num_workers=2, batch_chars=20_000)


def test_sampling_keeps_totals_and_rounding():
    counts = Counter({w: c for w, c in zip(["the", "then", "there", "thx", "a", "ab", "abc", "zzz", "q", "qq"],
                                           [1, 1, 1, 5, 9, 17, 2, 1, 64, 3])})
    assert dict(sample_chunks(counts, 1)) == counts
    for k in (2, 4, 8):
        copies = dict(sample_chunks(counts, k))
        for chunk, c in counts.items():  # each chunk gets floor(c/k) or one more
            assert copies.get(chunk, 0) - c // k in (0, 1)
        for prefix in {c[:3] for c in counts}:  # each stratum keeps floor(its total / k)
            assert sum(n for c, n in copies.items() if c[:3] == prefix) == \
                sum(n for c, n in counts.items() if c[:3] == prefix) // k
    assert dict(sample_chunks(Counter({"the": 3, "then": 3, "there": 2}), 4)) == {"then": 1, "there": 1}


def test_sampled_training_stays_close_to_exact(docs, monkeypatch):
    """Large corpora feed the trainer 1/8 of the chunk occurrences; forced here on a small one."""
    held_out, train = docs[::10], [d for i, d in enumerate(docs) if i % 10]
    exact = Tokenizer.train(iter(train), vocab_size=1000)
    monkeypatch.setattr(tokenizer_module, "FEED_CHUNKS_MIN", 1000)
    stats = {}
    fed = chunk_feed(iter(train), stats=stats)
    assert stats["feed_scale"] == 8 and 0.1 < sum(map(len, fed)) / sum(map(len, train)) < 0.14
    sampled = Tokenizer.train(iter(train), vocab_size=1000)
    assert Tokenizer.train(iter(train), vocab_size=1000)._hf.to_str() == sampled._hf.to_str()  # deterministic
    size = sum(len(d.encode("utf-8")) for d in held_out)
    exact_bpt, sampled_bpt = (size / sum(map(len, t.encode(held_out))) for t in (exact, sampled))
    assert sampled_bpt > 0.97 * exact_bpt  # -1.3 % at this tiny scale; -0.06 % on 65 M chars of real text


def test_trainer_feed_reproduces_the_text_pretokens(tok):
    texts = ["Hello world, hello  world.\n  Indented  line", " lead", "x"]
    body, heads = Counter(), Counter()
    count_chunks_into(texts, body, heads)
    pretokenize = tok._hf.pre_tokenizer.pre_tokenize_str
    fed = Counter(w for t in trainer_feed(body, heads, 1) for w, _ in pretokenize(t))
    assert fed == Counter(w for t in texts for w, _ in pretokenize(t))


def test_training_errors():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(iter(["abc"]), vocab_size=200)
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.train(iter(["tiny text"]), vocab_size=1000)
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train(iter([]), vocab_size=300)
    with pytest.raises(TypeError, match="must be str"):
        Tokenizer.train(iter([b"bytes"]), vocab_size=300)


# ---------------------------------------------------------------------------------------------
# encoding

pieces = st.lists(st.text() | st.sampled_from(SPECIAL_TOKENS) | st.sampled_from(MULTILINGUAL), max_size=6)


@settings(max_examples=300, deadline=None)
@given(pieces)
def test_round_trip_and_byte_counts(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & {tok.encode_special(s) for s in SPECIAL_TOKENS}  # special text is plain text
    token_bytes = tok.token_bytes()
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def hf_ids(tok, text) -> list[int]:
    """What the trained HF tokenizer itself gives: the reference the tiktoken encoder must equal."""
    return tok._hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(pieces)
def test_tiktoken_encoder_equals_hf_on_any_text(tok, parts):
    text = "".join(parts)
    assert tok.encode(text) == hf_ids(tok, text)


def world_and_real_texts():
    """(texts, vocab): the synthetic world at the CPU speedrun's vocab; the shared corpus when present."""
    from tasks.world.documents import generate_documents
    yield list(generate_documents(0, 3000)), 2048
    if (SHARED_DATA / "corpus").exists():
        import pyarrow.parquet as pq
        texts = pq.read_table(SHARED_DATA / "corpus" / "shard_00004.parquet", columns=["text"]).column(0).to_pylist()
        yield texts, 8192


def test_tiktoken_encoder_equals_hf_on_the_world_and_real_text(tok, docs):
    cases = [(docs, None)] + list(world_and_real_texts())
    for texts, vocab in cases:
        trained = tok if vocab is None else Tokenizer.train(iter(texts), vocab_size=vocab)
        ours = trained.encode(texts)
        assert ours == [e.ids for e in trained._hf.encode_batch_fast(texts, add_special_tokens=False)]
        assert trained.encode(texts, num_threads=1) == ours
        assert sum(map(len, ours)) > 100_000


def test_special_token_text_is_never_special(tok):
    text = "<|bos|><|user_start|>hi<|assistant_end|>"
    ids = tok.encode(text)
    assert max(ids) < tok.vocab_size - 9 and len(ids) > 3
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id] + ids) == "<|bos|>" + text


def test_batch_prepend_append(tok, docs):
    texts = docs[:20] + ["", "<|bos|>"]
    single = [tok.encode(t) for t in texts]
    assert tok.encode(texts) == single
    assert tok.encode(texts, num_threads=1) == single
    assert tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>")) == \
        [[tok.bos_token_id] + ids + [tok.encode_special("<|assistant_end|>")] for ids in single]
    assert tok.encode("abc", prepend=tok.bos_token_id) == [tok.bos_token_id] + tok.encode("abc")
    assert tok.encode([]) == []


def test_token_bytes_counts_raw_bytes_of_partial_utf8_tokens(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype.is_floating_point is False and token_bytes.shape == (tok.vocab_size,)
    assert token_bytes[-9:].tolist() == [0] * 9
    partial = decoded_wrong = 0
    for i in range(tok.vocab_size - 9):
        raw = token_raw_bytes(tok, i)
        assert token_bytes[i] == len(raw)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
        decoded_wrong += len(tok.decode([i]).encode("utf-8")) != len(raw)
    assert partial > 128 + 10  # the lone non-ASCII bytes, plus learned pieces of CJK characters and emoji
    assert decoded_wrong > 128  # what counting the bytes of decoded text would get wrong
    assert sorted(token_raw_bytes(tok, i) for i in range(256)) == [bytes([b]) for b in range(256)]


# ---------------------------------------------------------------------------------------------
# saving and loading

def test_save_load_roundtrip(tok, docs, tmp_path):
    folder = tmp_path / "tok"
    tok.save(folder)
    tok.save(folder)  # saving over an existing tokenizer replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp folders left behind
    loaded = Tokenizer.load(folder)
    assert loaded.vocab_size == tok.vocab_size and loaded.bos_token_id == tok.bos_token_id
    assert loaded.encode(docs[:10]) == tok.encode(docs[:10])
    assert loaded.encode("<|bos|>") == tok.encode("<|bos|>")  # still plain text after a reload
    assert loaded.token_bytes().tolist() == tok.token_bytes().tolist()
    assert np.load(folder / "token_bytes.npy").tolist() == tok.token_bytes().tolist()


def test_get_tokenizer_errors(tok):
    with pytest.raises(UserError, match=r"no tokenizer in .*tokenizer: run `python -m scripts.tok_train` first"):
        get_tokenizer()
    tok.save(get_base_dir() / "tokenizer")
    assert get_tokenizer().encode("hello") == tok.encode("hello")
    (get_base_dir() / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer file"):
        get_tokenizer()


# ---------------------------------------------------------------------------------------------
# chat rendering

def expected(tok, spans):
    """ids and mask from (token id | text, mask) spans."""
    ids, mask = [], []
    for piece, m in spans:
        piece_ids = [piece] if isinstance(piece, int) else tok.encode(piece)
        ids += piece_ids
        mask += [m] * len(piece_ids)
    return ids, mask


def test_render_plain_conversation(tok):
    s = tok.encode_special
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                         {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}]}
    assert tok.render_conversation(conv) == expected(tok, [
        (tok.bos_token_id, 0), (s("<|user_start|>"), 0), ("What is 2+2?", 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), ("It is 4.", 1), (s("<|assistant_end|>"), 1),
        (s("<|user_start|>"), 0), ("Thanks!", 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), ("You're welcome.", 1), (s("<|assistant_end|>"), 1)])


def test_render_tool_call_and_output(tok):
    s = tok.encode_special
    conv = {"messages": [
        {"role": "user", "content": "How much is 12*7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                          {"type": "python", "text": "12*7"},
                                          {"type": "python_output", "text": "84"},
                                          {"type": "text", "text": " So 84."}]}]}
    assert tok.render_conversation(conv) == expected(tok, [
        (tok.bos_token_id, 0), (s("<|user_start|>"), 0), ("How much is 12*7?", 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), ("Let me compute: ", 1),
        (s("<|python_start|>"), 1), ("12*7", 1), (s("<|python_end|>"), 1),
        (s("<|output_start|>"), 0), ("84", 0), (s("<|output_end|>"), 0),
        (" So 84.", 1), (s("<|assistant_end|>"), 1)])


def test_render_system_message_merges_into_first_user_turn(tok):
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)


def test_render_truncates_and_completion_prompt(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok " * 300}]}
    ids, mask = tok.render_conversation(conv)
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=10**9)
    short_ids, short_mask = tok.render_conversation(conv, max_tokens=50)
    assert len(full_ids) > 600 and (short_ids, short_mask) == (full_ids[:50], full_mask[:50])
    assert len(ids) == len(mask) == min(2048, len(full_ids))

    start = tok.encode_special("<|assistant_start|>")
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    prompt = tok.render_for_completion(conv)
    assert prompt == tok.render_conversation({"messages": conv["messages"][:1]})[0] + [start]
    assert tok.render_for_completion({"messages": conv["messages"][:1]}) == prompt
    assert conv["messages"][-1]["content"] == "Hello"  # the caller's conversation is not modified


@pytest.mark.parametrize("conv, message", [
    ({"messages": []}, "no messages"),
    ({}, "'messages' list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "turn 0 is from assistant but must be from user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "turn 1 is from user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "turn 1 is from system"),
    ({"messages": [{"role": "system", "content": "s"}]}, "followed by a user message"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "role system/user/assistant"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, r"turn 0 \(user\) content must be a string"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     "unknown part"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": 3}]}]},
     "'text' must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
     "string or a list of parts"),
])
def test_malformed_conversations_raise(tok, conv, message):
    with pytest.raises(ValueError, match=message):
        tok.render_conversation(conv)


# ---------------------------------------------------------------------------------------------
# the stages

def test_tok_train_and_tok_eval_stages(docs, tmp_path, capsys):
    from nanopipe.shard_writer import ShardWriter
    from nanopipe.report import report_dir
    from scripts import tok_eval, tok_train

    with pytest.raises(SystemExit) as exit_info:  # no tokenizer yet: one clear line, exit 2
        tok_eval.main(["--data", "tiny"])
    assert exit_info.value.code == 2 and "run `python -m scripts.tok_train` first" in capsys.readouterr().err

    with ShardWriter(get_base_dir() / "data" / "tiny", docs_per_shard=40, row_group_size=10) as writer:
        for doc in docs:
            writer.write(doc)
    tok_train.main(["--data", "tiny", "--vocab-size", "700", "--max-chars", "150000", "--doc-cap", "2500"])
    section = json.loads((report_dir() / "sections" / "01-tok_train.json").read_text())
    assert section["data"]["vocab_size"] == 700 and 150_000 <= section["data"]["chars"] < 152_500
    assert section["data"]["feed_scale"] == 1
    assert get_tokenizer().vocab_size == 700

    tok_eval.main(["--data", "tiny"])
    section = json.loads((report_dir() / "sections" / "02-tok_eval.json").read_text())
    bpt = section["data"]["bytes_per_token"]
    assert set(bpt) == {"tiny val", "prose", "code", "math", "numbers", "non-english"}
    assert 1.0 < section["data"]["val_bytes_per_token"] == bpt["tiny val"]["ours"] < 6
    assert "| code |" in (report_dir() / "sections" / "02-tok_eval.md").read_text()
    for label in ("GPT-2", "GPT-4"):  # compared when loadable offline, else named as missing: one or the other
        assert (label in section["data"]["baselines_missing"]) != (label in bpt["prose"])

    with pytest.raises(SystemExit) as exit_info:  # too little text for the vocab: a UserError, not a traceback
        tok_train.main(["--data", "tiny", "--vocab-size", "30000", "--max-chars", "1000"])
    assert exit_info.value.code == 2 and "smaller vocab_size" in capsys.readouterr().err
