"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), its special tokens, and chat rendering with a loss mask.

    tok = Tokenizer.train(texts, vocab_size=32768)     # texts: any iterator of str
    tok.save(get_base_dir() / "tokenizer")
    tok = get_tokenizer()                               # what every later stage calls
    ids = tok.encode("hello", prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})

Training is BPE over GPT-4-style pre-tokens, made fast by counting the text first. Text is cut into "chunks"
at every space followed by a non-space character: no pre-token of SPLIT_PATTERN ever spans such a cut, so the
pre-tokens of a text are exactly the pre-tokens of its chunks. Chunks repeat a lot (8.4 M chunks, 1.25 M
distinct in 65 M chars of real text), so they are counted in Python worker processes and the HF trainer reads
each distinct chunk repeated count/k times instead of the whole text. With k = 1 (any corpus under ~2 M chunks)
this is exactly the training on the raw text. Larger corpora use k up to 8, sampled with the rounding error
carried within each stratum of chunks sharing a prefix, so every chunk family keeps its share: on 65 M chars
of real text (vocab 32768) that costs 0.06 % of compression and trains 3x faster than the plain HF trainer,
in 0.6x the time rustbpe takes (bench/bench_tokenizer.py).

Encoding runs on tiktoken (as nanochat's does), built from the trained vocabulary: BPE by merge rank, where
each merged token's id is its rank. It gives the HF tokenizer's ids on every text tested (tests/test_tokenizer.py:
the corpus, the synthetic world, edge cases) at several times its speed on one thread (bench/bench_loader.py),
and the pretraining loader must keep up with a GPU. tokenizer.json stays the format on disk and in exports.
"""

import itertools
import json
import multiprocessing
import os
import queue
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanopipe.common import UserError, disk_space, get_base_dir, replace_dir, temp_dir_beside

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a calculator call, written by the assistant
    "<|output_start|>", "<|output_end|>",  # its result, forced into the stream by the engine
]
# GPT-4's split pattern, except numbers split into groups of 1-2 digits (not 1-3): better for small vocabs
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
DEFAULT_VOCAB_SIZE = 32768  # 2**15, the specials included

# A chunk boundary: a space followed by a non-space. Python's \s is a superset of the pattern's \s (it adds
# \x1c-\x1f), so Python never cuts where SPLIT_PATTERN would keep a space run together.
CHUNK_BOUNDARY = re.compile(r" (?=\S)")
FEED_SCALE_MAX = 8  # at most 1 in 8 chunk occurrences is fed to the trainer...
FEED_CHUNKS_MIN = 1_000_000  # ...and never fewer than this many (small corpora are trained exactly)
STRATUM_CHARS = 3  # chunks sharing their first 3 characters are sampled together
NUM_PARTITIONS = 8  # batch i is counted and sampled in partition i % 8, whatever the number of processes
BATCH_CHARS = 1 << 20  # text per batch


# ---------------------------------------------------------------------------------------------
# training: count chunks, feed the HF trainer a (possibly scaled) repetition of each distinct chunk

def count_chunks_into(texts, body: Counter, heads: Counter):
    """Count the chunks of `texts`: `body` holds chunks after a cut (stored without their leading space),
    `heads` the first chunk of each text (which has no space in front, so it cannot be glued to others)."""
    for text in texts:
        pieces = CHUNK_BOUNDARY.split(text)
        if pieces[0]:
            heads[pieces[0]] += 1
        body.update(itertools.islice(pieces, 1, None))


def feed_scale(total_chunks: int) -> int:
    """k: the trainer sees about total_chunks / k chunk occurrences (k = 1 is exact BPE)."""
    return max(1, min(FEED_SCALE_MAX, total_chunks // FEED_CHUNKS_MIN))


def sample_chunks(counts: Counter, k: int):
    """(chunk, copies) with about count/k copies of each chunk (floor or one more): within each stratum (chunks
    sharing a prefix) the rounding remainder is carried from one chunk to the next, so a stratum's copies are
    exactly its total count / k, rounded down, and rare chunk families keep their share. k = 1: the counts."""
    carry = {}
    for chunk, count in counts.items():
        stratum = chunk[:STRATUM_CHARS]
        copies, carry[stratum] = divmod(carry.get(stratum, 0) + count, k)
        if copies:
            yield chunk, copies


def trainer_feed(body: Counter, heads: Counter, k: int, piece_chars=1 << 16):
    """The texts the HF trainer reads for one partition. Body chunks start with a cut (space + non-space), so any
    number of them can be concatenated without changing their pre-tokens; head chunks go one per text."""
    buf, size = [], 0
    for piece, copies in sample_chunks(body, k):
        buf.append((" " + piece) * copies)
        size += (len(piece) + 1) * copies
        if size >= piece_chars:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)
    for head, copies in sample_chunks(heads, k):
        for _ in range(copies):
            yield head


class _Partitions:
    """The chunk counts of the partitions one process owns."""

    def __init__(self, owned):
        self.counts = {p: (Counter(), Counter()) for p in owned}

    def add(self, partition, texts):
        count_chunks_into(texts, *self.counts[partition])

    def sizes(self):
        """(chunk occurrences, distinct chunks)"""
        return (sum(sum(b.values()) + sum(h.values()) for b, h in self.counts.values()),
                sum(len(b) + len(h) for b, h in self.counts.values()))

    def feed(self, k):
        return {p: list(trainer_feed(body, heads, k)) for p, (body, heads) in self.counts.items()}


def _partition_worker(owned, tasks, results):
    try:
        parts = _Partitions(owned)
        for partition, texts in iter(tasks.get, None):
            parts.add(partition, texts)
        results.put(parts.sizes())
        results.put(parts.feed(tasks.get()))
    except BaseException as e:
        results.put(e)  # the parent re-raises it
        raise


def _batches(texts, batch_chars):
    batch, size = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"training text must be str, got {type(text).__name__}")
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_helpers(helpers, results):
    for h in helpers:
        if h.exitcode not in (None, 0):
            try:  # a helper that failed put its exception on the results queue before exiting
                error = results.get(timeout=1.0)
            except queue.Empty:
                error = None
            if isinstance(error, BaseException):
                raise error
            raise RuntimeError(f"a chunk-counting process died with exit code {h.exitcode} (out of memory?)")


def _put_watching(q, item, helpers, results):
    while True:
        try:
            return q.put(item, timeout=1.0)
        except queue.Full:
            _check_helpers(helpers, results)


def _get_watching(results, helpers):
    while True:
        try:
            item = results.get(timeout=1.0)
        except queue.Empty:
            _check_helpers(helpers, results)
            continue
        if isinstance(item, BaseException):
            raise item
        return item


def chunk_feed(texts, num_workers=None, batch_chars=BATCH_CHARS, stats=None) -> list[str]:
    """Count the chunks of an iterator of texts and return what the HF trainer should read: each distinct
    chunk repeated count/k times (see sample_chunks), k = feed_scale(total chunk occurrences).

    Batch i of the text goes to partition i % NUM_PARTITIONS; each partition is counted and sampled on its own,
    in num_workers forked processes (default: one per CPU, at most NUM_PARTITIONS) while this process reads the
    text. The result depends only on the text, not on the number of processes. Text that fits in one batch, or
    a platform without fork, is handled in this process."""
    num_workers = min(num_workers or os.cpu_count() or 1, NUM_PARTITIONS)
    batches = _batches(texts, batch_chars)
    first = next(batches, [])
    second = next(batches, None)
    batches = itertools.chain([first], [] if second is None else [second], batches)
    if second is None or num_workers < 2 or not sys.platform.startswith("linux"):
        parts = _Partitions(range(NUM_PARTITIONS))
        for i, batch in enumerate(batches):
            parts.add(i % NUM_PARTITIONS, batch)
        total, distinct = parts.sizes()
        feeds = parts.feed(feed_scale(total))
    else:
        # fork: the helpers need nothing from this process but this module's functions, and start in milliseconds
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        tasks = [ctx.Queue(maxsize=2) for _ in range(num_workers)]  # bounded: memory stays flat
        helpers = [ctx.Process(target=_partition_worker, daemon=True,
                               args=(range(w, NUM_PARTITIONS, num_workers), tasks[w], results))
                   for w in range(num_workers)]
        for h in helpers:
            h.start()
        try:
            for i, batch in enumerate(batches):
                partition = i % NUM_PARTITIONS
                _put_watching(tasks[partition % num_workers], (partition, batch), helpers, results)
            for q in tasks:
                _put_watching(q, None, helpers, results)
            sizes = [_get_watching(results, helpers) for _ in helpers]
            total, distinct = map(sum, zip(*sizes))
            for q in tasks:
                q.put(feed_scale(total))
            feeds = {}
            for _ in helpers:
                feeds.update(_get_watching(results, helpers))
            for h in helpers:
                h.join()
        finally:
            for h in helpers:
                if h.is_alive():  # only on an error path (e.g. the text iterator raised)
                    h.terminate()
                    h.join()
    if stats is not None:
        stats.update(chunks=total, distinct_chunks=distinct, feed_scale=feed_scale(total))
    return [text for p in sorted(feeds) for text in feeds[p]]


def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet's inverse: GPT-2's printable character for each of the 256 bytes -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]  # mapped to U+0100.. in byte order
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _tiktoken_encoding(hf: HFTokenizer, special_ids) -> tiktoken.Encoding:
    """The same BPE as a tiktoken Encoding: rank = token id, so merges happen in the order training made them."""
    byte_of = _byte_of_char()
    ranks = {bytes(byte_of[c] for c in hf.id_to_token(i)): i
             for i in range(hf.get_vocab_size(with_added_tokens=True)) if i not in special_ids}
    return tiktoken.Encoding("nanopipe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux; macOS has none, so all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _new_hf_tokenizer() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())  # no unk token: all 256 bytes are in the vocab, so none is ever needed
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """A trained tokenizer: ids 0..V-10 are byte-level BPE tokens, the last 9 ids the special tokens."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # special tokens are only ever produced by encode_special/rendering: their text in user input is plain text
        self._hf.encode_special_tokens = True
        self._special_ids = {}
        for name in SPECIAL_TOKENS:
            token_id = hf.token_to_id(name)
            if token_id is None:
                raise ValueError(f"tokenizer lacks the special token {name}")
            self._special_ids[name] = token_id
        self.bos_token_id = self._special_ids["<|bos|>"]
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._token_bytes = None
        self._tiktoken = _tiktoken_encoding(hf, set(self._special_ids.values()))

    # --- training, saving, loading

    @classmethod
    def train(cls, text_iterator, vocab_size=DEFAULT_VOCAB_SIZE, num_workers=None, stats=None) -> "Tokenizer":
        """Learn vocab_size - 9 byte-level BPE tokens from an iterator of texts, then append the specials.
        `stats`, if a dict, receives what the report shows: chunk counts and the feed scale k."""
        num_merges = vocab_size - len(SPECIAL_TOKENS) - 256
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} specials")
        feed = chunk_feed(text_iterator, num_workers, stats=stats)
        if not feed:
            raise ValueError("no training text")
        hf = _new_hf_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=0,
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(feed, trainer)
        learned = hf.get_vocab_size()
        if learned < vocab_size - len(SPECIAL_TOKENS):
            raise ValueError(f"the training text only supports {learned - 256} merges, {num_merges} were asked "
                             f"for: give more text or a smaller vocab_size")
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf)

    def save(self, directory):
        """Write tokenizer.json, token_bytes.npy and meta.json into `directory`, atomically: into a temp
        folder first, then renamed into place (a killed save never leaves a half tokenizer behind, and the
        next save removes the temp folder a killed one left). A full disk is one line with the space needed."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        text = self._hf.to_str()
        token_bytes = self.token_bytes().numpy().astype(np.int32)
        meta = {"vocab_size": self.vocab_size, "special_tokens": self._special_ids, "split_pattern": SPLIT_PATTERN}
        needed = len(text.encode("utf-8")) + token_bytes.nbytes + (1 << 16)
        tmp = None
        try:
            with disk_space(directory.parent, needed, "the tokenizer"):
                tmp = temp_dir_beside(directory)
                (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
                np.save(tmp / "token_bytes.npy", token_bytes)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                replace_dir(tmp, directory)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise UserError(f"no tokenizer in {directory}: run `python -m scripts.tok_train` first")
        try:
            hf = HFTokenizer.from_file(str(path))
            return cls(hf)
        except Exception as e:  # the HF parser raises plain Exceptions for corrupt json
            raise UserError(f"corrupt tokenizer file {path} ({e}): run `python -m scripts.tok_train` again") from None

    # --- encoding and decoding

    def _token_id(self, token) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {' '.join(SPECIAL_TOKENS)}") from None

    def encode(self, text_or_list, prepend=None, append=None, num_threads=None):
        """ids of a str, or a list of id lists for a list of str. `prepend`/`append`: a token id or special
        token name added to every sequence. Special-token text is encoded as text, never as a special token.

        A list is encoded on `num_threads` threads outside the GIL (default: this rank's share of the CPUs the
        process may use, torchrun's ranks on a node splitting them); num_threads=1 encodes it in the calling thread."""
        single = isinstance(text_or_list, str)
        texts = [text_or_list] if single else list(text_or_list)
        num_threads = num_threads or max(1, _usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if num_threads == 1 or len(texts) == 1:
            encoded = [self._tiktoken.encode_ordinary(t) for t in texts]
        else:
            encoded = self._tiktoken.encode_ordinary_batch(texts, num_threads=num_threads)
        if prepend is not None or append is not None:
            head = [] if prepend is None else [self._token_id(prepend)]
            tail = [] if append is None else [self._token_id(append)]
            encoded = [head + ids + tail for ids in encoded]
        return encoded[0] if single else encoded

    def to_json(self) -> str:
        """The Hugging Face tokenizer's serialisation (what tokenizer.json holds)."""
        return self._hf.to_str()

    def decode(self, ids) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        """The token's text in the byte-level alphabet (e.g. 'Ġthe'), or the special token's name."""
        return self._hf.id_to_token(token_id)

    def token_bytes(self):
        """torch.LongTensor[vocab_size]: how many bytes of text each token stands for; 0 for special tokens.

        Each character of a byte-level token is one byte, so this is the length of the token string. (Decoding
        a token to text instead turns the ~200 tokens that hold part of a UTF-8 character into U+FFFD.)"""
        if self._token_bytes is None:
            specials = set(self._special_ids.values())
            lengths = [0 if i in specials else len(self._hf.id_to_token(i)) for i in range(self.vocab_size)]
            self._token_bytes = torch.tensor(lengths, dtype=torch.long)
        return self._token_bytes.clone()

    # --- chat rendering

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask is 1 on the tokens the model is trained to write: assistant text,
        its calculator calls (python_start..python_end) and <|assistant_end|>. Truncated to max_tokens."""
        ids, mask = [], []

        def add(tokens, trained):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([int(trained)] * len(tokens))

        add(self.bos_token_id, False)
        special = self._special_ids
        for i, message in enumerate(_chat_turns(conversation)):
            content = message["content"]
            if message["role"] == "user":
                add(special["<|user_start|>"], False)
                add(self.encode(content), False)
                add(special["<|user_end|>"], False)
                continue
            add(special["<|assistant_start|>"], False)
            for part in _assistant_parts(content, i):
                if part["type"] == "text":
                    add(self.encode(part["text"]), True)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], True)
                    add(self.encode(part["text"]), True)
                    add(special["<|python_end|>"], True)
                else:  # python_output: the engine supplies it at inference, so it is not trained
                    add(special["<|output_start|>"], False)
                    add(self.encode(part["text"]), False)
                    add(special["<|output_end|>"], False)
            add(special["<|assistant_end|>"], True)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for the next assistant reply: a final assistant message is dropped, <|assistant_start|>
        appended. Not truncated (the caller decides what fits its context)."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            conversation = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(conversation, max_tokens=sys.maxsize)
        return ids + [self._special_ids["<|assistant_start|>"]]


def check_conversation(conversation) -> None:
    """ValueError naming the problem unless `conversation` is a complete chat, one render_conversation takes: an
    optional system message, user/assistant turns alternating from user and ending with assistant, user text a
    string, assistant text a string or a list of text/python/python_output parts."""
    turns = _chat_turns(conversation)
    if len(turns) % 2:
        raise ValueError("the conversation ends with a user turn: it needs the assistant's reply")
    for i in range(1, len(turns), 2):
        _assistant_parts(turns[i]["content"], i)


def _chat_turns(conversation) -> list[dict]:
    """The messages as alternating user/assistant turns, a leading system message merged into the first user
    turn. ValueError naming the problem for anything else."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("a conversation is a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ValueError(f"message {i} must be a dict with role system/user/assistant and content, got {m!r:.80}")
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            raise ValueError(f"system message content must be a string, got {type(system).__name__}")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[1]["content"], str):
            raise ValueError(f"message 1 (user) content must be a string, got {type(messages[1]['content']).__name__}")
        merged = {"role": "user", "content": system + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"turn {i} is from {m['role']} but must be from {expected}: roles alternate, user first "
                             f"(one optional system message at the very start)")
        if expected == "user" and not isinstance(m["content"], str):
            raise ValueError(f"turn {i} (user) content must be a string, got {type(m['content']).__name__}")
    return messages


def _assistant_parts(content, turn: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"turn {turn} (assistant) content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
            raise ValueError(f"turn {turn} part {j}: unknown part {part!r:.80} (type must be text, python or "
                             f"python_output)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"turn {turn} part {j} ({part['type']}): 'text' must be a string")
    return content


def get_tokenizer() -> Tokenizer:
    """The pipeline's tokenizer, <base>/tokenizer (UserError naming the command that makes it if missing)."""
    return Tokenizer.load(get_base_dir() / "tokenizer")
