"""
Bits per byte: a loss that does not depend on the tokenizer.

bpb = sum of the loss in nats over target tokens / (ln 2 * sum of the UTF-8 byte lengths of those tokens).
Special tokens have 0 bytes and are left out of both sums, as are ignored targets (-1). Sums are kept in
float64 and all-reduced across ranks.
"""

import math
from pathlib import Path

import torch
import torch.distributed as dist

from nanopipe.common import UserError, read_text_file


def _bpb_sums(losses, y, token_bytes):
    """(sum of nats, sum of bytes) over the targets that count toward bpb (bytes > 0, not ignored)."""
    nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
    return (losses.double() * (nbytes > 0)).sum(), nbytes.sum().double()


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """bpb over `steps` batches (x, y) from `batches` (fewer if it runs out); inf if no target had bytes."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for _, (x, y) in zip(range(steps), batches):
        x, y = x.to(device), y.to(device)
        losses = model(x, targets=y, loss_reduction="none")  # (B, T), 0 where y == -1
        nats, nbytes = _bpb_sums(losses, y, token_bytes)
        total_nats += nats
        total_bytes += nbytes
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    model.train(was_training)
    if total_bytes.item() == 0:
        return float("inf")
    return (total_nats / (math.log(2) * total_bytes)).item()


def text_windows(ids: list[int], seq_len: int):
    """Consecutive (input, target) windows covering every token after the first exactly once as a target;
    the last window's missing targets are -1."""
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start:start + seq_len + 1]
        x = chunk[:-1]
        y = chunk[1:]
        pad = seq_len - len(x)
        yield x + [0] * pad, y + [-1] * pad


@torch.no_grad()
def evaluate_text(model, tokenizer, paths, batch_size: int = 8, seq_len: int | None = None) -> dict:
    """Loss on local text files, each tokenized as one document after bos, in windows of seq_len tokens.

    Returns {"bpb", "loss_per_token", "perplexity", "tokens", "bytes", "files": {path: the same metrics}}.
    """
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    seq_len = seq_len or model.config.sequence_len
    token_bytes = tokenizer.token_bytes().to(device)
    sums = {}  # path -> [nats over all targets, nats over targets with bytes, bytes, tokens]
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no text file {path}: pass existing files to --text")
        text = read_text_file(path)
        if not text:
            raise UserError(f"{path} is empty: nothing to evaluate")
        ids = tokenizer.encode(text, prepend=tokenizer.bos_token_id)
        windows = list(text_windows(ids, seq_len))
        acc = torch.zeros(3, dtype=torch.float64, device=device)
        for b in range(0, len(windows), batch_size):
            x = torch.tensor([w[0] for w in windows[b:b + batch_size]], dtype=torch.long, device=device)
            y = torch.tensor([w[1] for w in windows[b:b + batch_size]], dtype=torch.long, device=device)
            losses = model(x, targets=y, loss_reduction="none")
            counted_nats, counted_bytes = _bpb_sums(losses, y, token_bytes)
            acc += torch.stack([losses.double().sum(), counted_nats, counted_bytes])
        sums[str(path)] = acc.tolist() + [len(ids) - 1]
    model.train(was_training)
    result = _text_metrics(*[sum(column) for column in zip(*sums.values())])
    result["files"] = {path: _text_metrics(*values) for path, values in sums.items()}
    return result


def _text_metrics(nats: float, counted_nats: float, nbytes: float, tokens: int) -> dict:
    loss = nats / max(tokens, 1)
    return {
        "bpb": counted_nats / (math.log(2) * nbytes) if nbytes else float("inf"),
        "loss_per_token": loss,
        "perplexity": math.exp(loss),
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }
