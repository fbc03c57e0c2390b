"""One training step for base_train and chat_sft: accumulate, normalise, clip, update; prefetching; progress.

The loss of a step is the sum of its token losses over the trained tokens of the whole step on all ranks
(targets of -1 are not trained), the same for pretraining (where every token counts) and SFT (where a
micro-batch without a trained token adds nothing, nanochat #618). Everything stays on the device until one
host sync per step reads loss, grad norm, trained tokens and progress together; the loader runs in a
background thread, so the next micro-batches are packed while the GPU computes.
"""

import contextlib
import math
import os
import queue
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanopipe.common import _DTYPES as DTYPES
from nanopipe.common import (DistInfo, UserError, autocast, autodetect_device, autodetect_dtype, format_duration,
                             init_distributed, seed_everything)
from nanopipe.progress import interactive


def training_dtype(device: str, bf16_supported: bool | None = None, requested: str | None = None) -> torch.dtype:
    """The compute dtype of a training stage, refusing what the step cannot train in.

    fp16 needs loss scaling (a GradScaler), which this step does not do; a CUDA GPU without bf16 (before
    Ampere) trains in fp32 only when asked for explicitly, since that is several times slower.
    """
    requested = os.environ.get("NANOPIPE_DTYPE") if requested is None else requested
    if requested:
        if requested not in DTYPES:
            raise UserError(f"NANOPIPE_DTYPE={requested!r} is not a dtype: use bfloat16 or float32")
        dtype = DTYPES[requested]
    elif device == "cuda":
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if not supported:
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
            raise UserError(f"{name} has no bf16: set NANOPIPE_DTYPE=float32 to train in fp32 (slow), "
                            f"or use an Ampere or newer GPU")
        dtype = torch.bfloat16
    else:
        dtype = autodetect_dtype(device)
    if dtype == torch.float16:
        raise UserError("NANOPIPE_DTYPE=float16 is not supported for training (fp16 needs loss scaling, which "
                        "this step does not do): use bfloat16 (Ampere or newer) or float32")
    return dtype


def start_training(device: str | None, seed: int) -> tuple[str, DistInfo, torch.dtype, object]:
    """A training stage's start: (device, torchrun ranks, compute dtype, its autocast context), RNGs seeded."""
    device = autodetect_device(device)
    info = init_distributed(device)
    dtype = training_dtype(device)
    seed_everything(seed)
    return device, info, dtype, autocast(device, dtype)


def wrap_model(model, info, device: str, compile: bool, backend: str | None = None):
    """The module the step calls: DDP under torchrun (no buffer broadcasts: the rotary tables are the same on
    every rank; gradients live in DDP's buckets, no second copy), compiled when asked."""
    train_model = model
    if info.is_ddp:
        train_model = DDP(model, device_ids=[info.local_rank] if device == "cuda" else None,
                          broadcast_buffers=False, gradient_as_bucket_view=True)
    if compile:
        train_model = torch.compile(train_model, dynamic=False, **({"backend": backend} if backend else {}))
    return train_model


class Prefetcher:
    """Pull micro-batches from `loader` in a background thread, `depth` ahead.

    state_dict() and progress describe the loader right after the last batch handed out (not the ones
    waiting in the queue), so a checkpoint resumes exactly where training is.
    """

    def __init__(self, loader, depth: int):
        self.loader = loader
        self.queue = queue.Queue(maxsize=max(1, depth))
        self._state, self._progress = loader.state_dict(), getattr(loader, "progress", None)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="prefetch", daemon=True)
        self.thread.start()

    def _work(self):
        while not self._stop.is_set():
            try:
                item = ("batch", next(self.loader), self.loader.state_dict(), getattr(self.loader, "progress", None))
            except BaseException as e:  # StopIteration included: handed to the consumer, which re-raises it
                item = ("error", e, None, None)
            while not self._stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if item[0] == "error":
                return

    def __iter__(self):
        return self

    def __next__(self):
        kind, value, state, progress = self.queue.get()
        if kind == "error":
            self.queue.put((kind, value, state, progress))  # every later call fails the same way
            raise value
        self._state, self._progress = state, progress
        return value

    def state_dict(self):
        return self._state

    @property
    def progress(self):
        return self._progress

    def close(self):
        self._stop.set()
        self.thread.join(timeout=5)


class TrainStep:
    """Forward/backward of grad_accum micro-batches, clipping and the optimizer update of one step."""

    def __init__(self, model, train_model, optimizers, grad_accum: int, amp, grad_clip: float, is_ddp: bool,
                 world: int):
        self.model, self.train_model, self.optimizers = model, train_model, optimizers
        self.grad_accum, self.amp, self.is_ddp, self.world = grad_accum, amp, is_ddp, world
        self.grad_clip = grad_clip if grad_clip > 0 else math.inf
        self.params = [p for p in model.parameters() if p.requires_grad]

    def accumulate(self, batches, progress: float | None = None) -> torch.Tensor:
        """Gradients of the step into .grad; returns [loss, grad norm, trained tokens, progress] on the device
        (progress: the minimum over ranks, so every rank stops at the same step)."""
        device = batches[0][1].device
        trained = torch.stack([(y != -1).sum() for _, y in batches]).sum().float()
        if self.is_ddp:
            dist.all_reduce(trained)
        # DDP averages gradients over ranks: scaling by world makes them the sum over all trained tokens
        scale = self.world / trained.clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        for micro, (x, y) in enumerate(batches):
            # DDP all-reduces gradients on the last micro-batch only
            no_sync = self.is_ddp and micro < len(batches) - 1
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext(), self.amp:
                loss = self.train_model(x, y, loss_reduction="sum")
            (loss * scale).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        progress_t = torch.tensor(-1.0 if progress is None else progress, dtype=torch.float32, device=device)
        if self.is_ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(progress_t, op=dist.ReduceOp.MIN)
        return torch.stack([loss_sum / trained.clamp(min=1), grad_norm.float(), trained, progress_t])

    def run(self, loader, progress=None) -> dict:
        """Pull one step's micro-batches and accumulate; the step's single host sync returns its numbers.
        `progress`: a number, or a callable asked after the batches were taken (e.g. the loader's epoch)."""
        batches = [next(loader) for _ in range(self.grad_accum)]
        stats = self.accumulate(batches, progress() if callable(progress) else progress)
        loss, grad_norm, trained, progress_value = stats.tolist()
        return {"loss": loss, "grad_norm": grad_norm, "trained_tokens": int(trained),
                "progress": None if progress_value < 0 else progress_value}

    def update(self, apply: bool = True):
        """The optimizers' step (unless not `apply`: a skipped spike), then clear the gradients."""
        if apply:
            for opt in self.optimizers:
                opt.step()
        self.model.zero_grad(set_to_none=True)


def format_step_line(step: int, total: int, fraction: float, fields: dict, eta_seconds: float | None,
                     estimated: bool = False) -> str:
    """`step 00120/02205 (5.4%) | loss 3.412 | lr 1.00 | dt 412ms | tok/s 1,271,000 | mfu 41.2 | eta 4h51m`
    (`/~02205` when the total is an estimate, e.g. SFT by epochs)."""
    width = max(5, len(str(total)))
    parts = [f"step {step:0{width}d}/{'~' if estimated else ''}{total:0{width}d} ({100 * fraction:.1f}%)"]
    for key, value in fields.items():
        if value is None:
            continue
        if key == "dt":
            parts.append(f"dt {1000 * value:.0f}ms")
        elif key == "tok/s":
            parts.append(f"tok/s {value:,.0f}")
        elif key == "lr":
            parts.append(f"lr {value:.2f}")
        elif key == "mfu":
            parts.append(f"mfu {value:.1f}")
        else:
            parts.append(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)


class StepProgress:
    """A tqdm bar on a terminal; one readable line per step when stdout is a file or a pipe (screen -L, tee):
    nanopipe.progress's rule, with a line every step because these lines are the training log. `total` None:
    not known in advance (SFT by epochs); each step then passes its estimate."""

    def __init__(self, total: int | None, initial: int, desc: str, enabled: bool, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.lines = enabled and not interactive(self.stream)
        self.known = total is not None
        self.total = total
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled or self.lines)

    def step(self, step: int, fields: dict, eta_seconds: float | None, fraction: float | None = None,
             total: int | None = None):
        if total is not None:
            self.total = self.bar.total = total
        fraction = step / self.total if fraction is None else fraction
        if self.lines:
            print(format_step_line(step, self.total, fraction, fields, eta_seconds, estimated=not self.known),
                  file=self.stream, flush=True)
            return
        shown = " | ".join(f"{k} {v:,.0f}" if k == "tok/s" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in fields.items() if v is not None and k not in ("dt", "lr"))
        eta = f" | eta {format_duration(eta_seconds)}" if eta_seconds is not None else ""
        self.bar.set_postfix_str(shown + eta, refresh=False)
        self.bar.update(step - self.bar.n)

    def note(self, line: str):
        """A line of its own (val bpb, a spike), below the bar or between the step lines."""
        if not self.enabled:
            return
        if self.lines:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class StepClock:
    """Seconds per step, excluding each run's first step (compilation, warmup): tok/s, MFU and the ETA."""

    def __init__(self, loop, tokens_per_step: int, flops_per_token: float, peak_flops: float | None,
                 world: int):
        self.loop, self.tokens, self.flops, self.peak, self.world = loop, tokens_per_step, flops_per_token, \
            peak_flops, world
        self.first = True
        self.t0 = time.perf_counter()

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        dt = time.perf_counter() - self.t0
        if not self.first:
            self.loop.train_seconds += dt
            self.loop.timed_steps += 1
        self.first = False
        tok_per_sec = self.tokens / dt
        return {"dt": dt, "tok_per_sec": tok_per_sec, "mfu": self.mfu(tok_per_sec)}

    def mfu(self, tok_per_sec):
        return 100 * self.flops * tok_per_sec / (self.peak * self.world) if self.peak and tok_per_sec else None

    def mean_step_seconds(self, fallback: float) -> float:
        timed = self.loop.timed_steps
        return self.loop.train_seconds / timed if timed else fallback
