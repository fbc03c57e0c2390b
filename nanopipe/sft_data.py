"""Batches of rendered conversations for supervised fine-tuning.

Whole conversations are packed best-fit into rows of seq_len + 1 tokens (a conversation never spans two
rows), and whatever space is left is padded with <|bos|> whose targets are ignored (-1). Packing rather
than one-conversation-per-row because chat data is mostly short: padding every row to the longest
conversation would spend most of the compute on padding. Packed conversations see each other the same
way pretraining documents do (each starts with <|bos|>), which the model is already trained to handle.

Targets are -1 wherever the render mask is 0 (user turns, tool outputs, <|assistant_start|>, padding), so
only what the assistant produces is trained.

The loader is exactly resumable: its state is the cursor into the (already shuffled) conversation list
plus the indices of the conversations waiting in the packing buffer, which are re-rendered on resume.
"""

import torch


class SFTLoader:
    def __init__(self, tokenizer, conversations, batch_size: int, seq_len: int, device="cpu", rank: int = 0,
                 world_size: int = 1, loop: bool = True, buffer_size: int = 64, state: dict | None = None):
        if len(conversations) < world_size:
            raise ValueError(f"{len(conversations)} conversations cannot be shared by {world_size} ranks")
        self.tokenizer = tokenizer
        self.conversations = conversations
        self.batch_size = batch_size
        self.row_len = seq_len + 1
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.loop = loop
        self.buffer_size = buffer_size
        self.bos = tokenizer.bos_token_id
        # conversations this rank reads, in order: rank, rank + W, rank + 2W, ...
        self.per_rank = len(range(rank, len(conversations), world_size))
        state = state or {"cursor": 0, "buffer": []}
        self.cursor = state["cursor"]  # counts conversations taken by this rank, across epochs
        self.buffer = [self._render(i) for i in state["buffer"]]

    @property
    def progress(self) -> float:
        """Epochs of this rank's share consumed so far (conversations still in the buffer not counted)."""
        return (self.cursor - len(self.buffer)) / self.per_rank

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "buffer": [index for index, _, _ in self.buffer]}

    def _render(self, index: int):
        ids, mask = self.tokenizer.render_conversation(self.conversations[index], max_tokens=self.row_len)
        return index, ids, mask

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            if not self.loop and self.cursor >= self.per_rank:
                return
            index = self.rank + (self.cursor % self.per_rank) * self.world_size
            self.cursor += 1
            self.buffer.append(self._render(index))

    def _next_row(self) -> tuple[list[int], list[int]] | None:
        ids, mask = [], []
        while True:
            self._refill()
            space = self.row_len - len(ids)
            fitting = [j for j, (_, conv_ids, _) in enumerate(self.buffer) if len(conv_ids) <= space]
            if not fitting:
                break
            best = max(fitting, key=lambda j: len(self.buffer[j][1]))  # largest that fits; ties: oldest
            _, conv_ids, conv_mask = self.buffer.pop(best)
            ids += conv_ids
            mask += conv_mask
        if not ids:
            return None
        pad = self.row_len - len(ids)
        return ids + [self.bos] * pad, mask + [0] * pad

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        inputs = ids[:, :-1]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -1)
        return inputs.to(self.device), targets.to(self.device)
