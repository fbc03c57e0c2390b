"""Supervised fine-tuning's pieces outside its loop: the schedules, the held-out loss, the loop state and what
the stage reports. scripts/chat_sft.py holds the loop."""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanopipe.common import format_duration
from nanopipe.report import fmt
from nanopipe.sft_data import SFTLoader
from nanopipe.training import LoopState, valid_device_batch_sizes


@dataclass
class SFTLoopState(LoopState):
    """chat_sft's loop state: the shared one, the val losses and the assistant tokens trained."""
    val_loss: float | None = None  # the last val loss on the held-out conversations
    initial_val_loss: float | None = None  # the val loss at step 0, before any SFT
    trained_tokens: int = 0  # assistant tokens trained so far (all ranks)


def lr_multiplier(step: int, progress: float, warmup_steps: int, warmdown_ratio: float) -> float:
    """(step + 1) / warmup_steps for the first warmup_steps steps (`step` = steps already taken), 1 until the
    last warmdown_ratio of training, then linearly down to 0."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if progress < 1 - warmdown_ratio:
        return warmup
    return min(warmup, max(0.0, (1 - progress) / warmdown_ratio))


def muon_momentum(it: int) -> float:
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps."""
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(optimizers, step: int, progress: float, warmup_steps: int, warmdown_ratio: float) -> float:
    """Set this step's LRs and Muon momentum; returns the LR multiplier."""
    lrm = lr_multiplier(step, progress, warmup_steps, warmdown_ratio)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    for group in optimizers[1].param_groups:
        group["momentum"] = muon_momentum(step)
    return lrm


@torch.no_grad()
def val_loss(model, tokenizer, val_mix, batch_size, seq_len, device, rank, world, amp) -> float:
    """Mean loss per trained token over the held-out conversations (every rank reads its share)."""
    model.eval()
    loader = SFTLoader(tokenizer, val_mix, batch_size, seq_len, device, rank, world, loop=False)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in loader:
        with amp:
            sums[0] += model(x, y, loss_reduction="sum").double()
        sums[1] += (y != -1).sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def min_over_ranks(value: float, device) -> float:
    t = torch.tensor(value, dtype=torch.float64, device=device)  # on the device: NCCL takes no CPU tensors
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def out_of_memory_message(batch: int, seq_len: int, world: int, total_batch: int) -> str:
    """The error line for a first SFT step that ran out of memory: the next smaller device batch whose micro-batches
    still add up to this total batch (the trained rows per step stay the same)."""
    head = f"out of memory in the first step with --device-batch-size {batch}"
    smaller = [b for b in valid_device_batch_sizes(total_batch, seq_len, world) if b < batch]
    if not smaller:
        return f"{head}: lower --max-seq-len"
    return (f"{head}: use --device-batch-size {smaller[-1]} or less with --total-batch-size {total_batch} "
            "(the total batch stays the same by accumulation)")


@dataclass
class SFTReport:
    """chat_sft's report data (its section's json `data`; report.md's summary reads it)."""
    train_loss: float | None  # the last logged train loss (nats/token)
    val_loss: float | None  # val loss after SFT (None with --eval-every -1)
    initial_val_loss: float | None  # val loss of the base model, before SFT
    num_steps: int  # optimizer steps
    tok_per_sec: float | None  # throughput over the timed steps, all ranks
    mfu: float | None  # model FLOPs utilisation in %
    trained_tokens: int  # assistant tokens trained
    train_seconds: float  # time in timed steps
    peak_memory_mb: float  # peak GPU memory allocated (process peak RSS on CPU)
    mixture: str  # the mixture spec trained on
    checkpoint: str  # the tag's SFT checkpoint folder
    rows: dict  # conversations per task of the mixture

    @classmethod
    def of_run(cls, loop: SFTLoopState, records: list[dict], total_batch: int, flops_per_token: float,
               peak_flops: float | None, world: int, **rest):
        """From the loop state and the log; `rest`: num_steps, peak_memory_mb, mixture, checkpoint, rows."""
        tok_per_sec = total_batch * loop.timed_steps / loop.train_seconds if loop.train_seconds else None
        mfu = 100 * flops_per_token * tok_per_sec / (peak_flops * world) if peak_flops and tok_per_sec else None
        return cls(train_loss=next((r["loss"] for r in reversed(records) if "loss" in r), None),
                   val_loss=loop.val_loss, initial_val_loss=loop.initial_val_loss, tok_per_sec=tok_per_sec, mfu=mfu,
                   trained_tokens=loop.trained_tokens, train_seconds=loop.train_seconds, **rest)

    def markdown(self, tag: str, table: list[tuple], shape: str) -> str:
        """`table`: (task, epochs, conversations) rows; `shape`: the batch as a phrase."""
        lines = [f"Fine-tuned base model `{tag}` on `{self.mixture}` for {self.num_steps} steps ({shape}); "
                 f"{self.trained_tokens:,} assistant tokens trained (user turns, tool outputs and padding masked).",
                 "", "| task | epochs | conversations |", "|---|---|---|"]
        lines += [f"| {name} | {epochs:g} | {rows:,} |" for name, epochs, rows in table]
        lines += ["", "| metric | value |", "|---|---|",
                  f"| final train loss | {fmt(self.train_loss)} |",
                  f"| val loss (held-out conversations) | {fmt(self.initial_val_loss)} before, "
                  f"{fmt(self.val_loss)} after |",
                  f"| tok/s | {fmt(self.tok_per_sec, 0)} |", f"| train time | {format_duration(self.train_seconds)} |"]
        return "\n".join(lines)
