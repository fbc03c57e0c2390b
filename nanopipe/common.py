"""Shared plumbing: base dir, device and dtype policy, torchrun/DDP, atomic writes, small utilities."""

import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (missing input, bad flag, corrupt file). One line: what and how to fix it."""


def get_base_dir() -> Path:
    base = Path(os.environ.get("NANOPIPE_BASE_DIR") or Path.home() / ".cache" / "nanopipe").expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temp file beside `path`; on success fsync and rename it into place, on error remove it.

    A reader therefore sees either the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    with atomic_write(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# device and dtype

def autodetect_device(override: str | None = None) -> str:
    """cuda > mps > cpu, unless `--device` (override) or NANOPIPE_DEVICE says otherwise."""
    choice = override or os.environ.get("NANOPIPE_DEVICE")
    if choice:
        if choice not in ("cuda", "mps", "cpu"):
            raise UserError(f"unknown device {choice!r} (from --device or NANOPIPE_DEVICE): use cuda, mps or cpu")
        if choice == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda was asked for but torch sees no CUDA GPU: check `nvidia-smi` and that a CUDA build of torch is installed")
        if choice == "mps" and not torch.backends.mps.is_available():
            raise UserError("device mps was asked for but is not available on this machine: use --device cpu")
        return choice
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def autodetect_dtype(device: str) -> torch.dtype:
    """The compute dtype: bf16 on CUDA with SM >= 80, fp32 elsewhere; NANOPIPE_DTYPE overrides."""
    name = os.environ.get("NANOPIPE_DTYPE")
    if name:
        if name not in _DTYPES:
            raise UserError(f"NANOPIPE_DTYPE={name!r} is not a dtype: use bfloat16, float16 or float32")
        return _DTYPES[name]
    if device == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


# bf16 dense peak FLOP/s by GPU name; the first substring match wins, so specific names come first.
_PEAK_FLOPS = [
    ("gb200", 2.5e15), ("grace blackwell", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("gb10", 209e12),
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("a100", 312e12), ("l40s", 362e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
    ("mi300x", 1.3074e15),
]


def peak_flops(device: str) -> float | None:
    """bf16 peak of the local GPU; None on CPU/MPS/unknown GPUs (MFU is then left blank, not faked).

    NANOPIPE_PEAK_FLOPS overrides, because published peaks (GB10 especially) are disputed.
    """
    if os.environ.get("NANOPIPE_PEAK_FLOPS"):
        return float(os.environ["NANOPIPE_PEAK_FLOPS"])
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return None


# ---------------------------------------------------------------------------------------------
# distributed

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    is_ddp: bool = False


def get_dist_info() -> DistInfo:
    """What torchrun told this process (rank 0 of 1 when not launched by torchrun)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ["WORLD_SIZE"]), True)
    return DistInfo()


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group: NCCL on CUDA (one GPU per local rank), gloo otherwise."""
    info = get_dist_info()
    if info.is_ddp and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group("gloo")
    return info


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_rank0() -> bool:
    return get_dist_info().rank == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Timer:
    """Wall-clock timer usable as a context manager; `.seconds` is live while running."""

    def __init__(self):
        self.start = time.perf_counter()
        self.end = None

    def __enter__(self):
        self.start = time.perf_counter()
        self.end = None
        return self

    def __exit__(self, *exc):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.end or time.perf_counter()) - self.start


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def debug_enabled() -> bool:
    return os.environ.get("NANOPIPE_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = 2):
    """Print one error line and exit: the uniform ending for a user-fixable problem."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def autocast(device: str, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU and MPS compute in fp32)."""
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
