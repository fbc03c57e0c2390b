"""Pretraining batches: stream documents, tokenize in batches, pack BOS-aligned rows best-fit, resume exactly.

Every row of T+1 tokens starts with <|bos|> (each document is tokenized with <|bos|> prepended and rows are
filled with whole documents from the front), and there is no padding:
  1. repeatedly place the LARGEST buffered document that still fits entirely in the row;
  2. when none fits, take the SHORTEST one and crop it to fill the row exactly (its tail is dropped).
x = row[:-1], y = row[1:]. A buffer of >= buffer_docs tokenized documents gives best-fit its choice.

state_dict() is the position of the last document read (shards.iter_documents) plus the buffered,
not-yet-used documents; a loader built with state=... yields exactly the batches the original would have.
Tokens live in numpy uint16 (uint32 for vocabularies over 65536), never in python lists.
"""

import numpy as np
import torch

from nanopipe.shards import iter_documents, list_shards


class PretrainLoader:
    def __init__(self, tokenizer, data_name, split, batch_size, seq_len, device="cpu", rank=0, world_size=1,
                 state=None, buffer_docs=1000, tokenizer_batch=128, tokenizer_threads=None):
        self.tokenizer = tokenizer
        self.tokenizer_threads = tokenizer_threads  # None: Tokenizer.encode's default
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.device = torch.device(device)
        self.buffer_docs = buffer_docs
        self.tokenizer_batch = tokenizer_batch
        self.bos = tokenizer.bos_token_id
        self.token_dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        self.position = None  # of the last document pulled into the buffer
        self.docs = []  # buffered tokenized documents, in arrival order (best-fit's ties go to the earliest)
        self.lengths = np.zeros(0, dtype=np.int64)
        if state is not None:
            self.position = state["position"]
            tokens = np.asarray(state["buffer_tokens"]).astype(self.token_dtype)
            self.lengths = np.asarray(state["buffer_lengths"]).astype(np.int64)
            self.docs = np.split(tokens, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []
        list_shards(data_name)  # fail now, with the command to run, if the dataset is missing
        self.documents = iter_documents(data_name, split, rank, world_size, start=self.position, loop=split == "train")
        self.exhausted = False

    def state_dict(self):
        """Small and checkpointable (plain ints and int32 tensors, safe for torch.load(weights_only=True))."""
        tokens = np.concatenate(self.docs) if self.docs else np.zeros(0, dtype=self.token_dtype)
        return {
            "position": None if self.position is None else dict(self.position),
            "buffer_tokens": torch.from_numpy(tokens.astype(np.int32)),
            "buffer_lengths": torch.from_numpy(self.lengths.copy()),
        }

    def _refill(self):
        """Top the buffer up to buffer_docs documents, tokenizing tokenizer_batch documents per call."""
        while len(self.docs) < self.buffer_docs and not self.exhausted:
            texts = []
            for text, position in self.documents:
                texts.append(text)
                self.position = position
                if len(texts) == self.tokenizer_batch:
                    break
            else:
                self.exhausted = True
            if texts:
                ids_lists = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.tokenizer_threads)
                encoded = [np.asarray(ids, dtype=self.token_dtype) for ids in ids_lists]
                self.docs.extend(encoded)
                self.lengths = np.concatenate([self.lengths, [len(ids) for ids in encoded]])

    def _take(self, index):
        self.lengths = np.delete(self.lengths, index)
        return self.docs.pop(index)

    def _pack_row(self, row):
        """Fill `row` (T+1 tokens) best-fit from the buffer; False if the data ran out first."""
        filled = 0
        while filled < len(row):
            self._refill()
            if not self.docs:
                return False
            space = len(row) - filled
            fitting = np.where(self.lengths <= space, self.lengths, -1)
            best = int(np.argmax(fitting))
            if fitting[best] > 0:
                doc = self._take(best)
            else:  # nothing fits whole: crop the shortest document to close the row
                doc = self._take(int(np.argmin(self.lengths)))[:space]
            row[filled:filled + len(doc)] = doc
            filled += len(doc)
        return True

    def __iter__(self):
        return self

    def __next__(self):
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in rows:
            if not self._pack_row(row):
                raise StopIteration  # only a non-looping (val) split ends; its last partial batch is dropped
        # x and y side by side in one (2, B, T) tensor: both contiguous, one host-to-device copy
        xy = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]))
        if self.device.type == "cuda":
            # pinned memory comes from torch's caching host allocator, which keeps it until the copy is done
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        else:
            xy = xy.to(self.device)
        return xy[0], xy[1]
