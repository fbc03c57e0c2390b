"""Shared plumbing: base dir, device and dtype policy, torchrun/DDP, atomic writes, small utilities."""

import contextlib
import errno
import hashlib
import importlib
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (missing input, bad flag, corrupt file). One line: what and how to fix it."""


def require_extra(stage: str, extra: str, *modules: str):
    """Import the optional packages a stage needs, or stop it with the pip command that installs its extra."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"{stage} needs {e.name}: pip install -e '.[{extra}]'") from None


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
    with disk_space(Path(path).parent, len(text.encode("utf-8")), f"writing {Path(path).name}"):
        with atomic_write(path, "w") as f:
            f.write(text)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# folders that appear whole, and a full disk

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(final: Path):
    """Remove the `.<name>.tmp-<pid>` / `.<name>.old-<pid>` folders beside `final` whose process is gone
    (a kill -9 or a power cut in the middle of a build): the next build cleans up after the dead one."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = path.name[len(final.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def temp_dir_beside(final: Path) -> Path:
    """A fresh empty `.<name>.tmp-<pid>` folder beside `final`, to build it in and then `replace_dir` it."""
    final = Path(final)
    remove_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path):
    """Put the complete folder `tmp` at `final` by renames, so readers see the old folder or the new one.

    POSIX has no atomic swap of two folders: between the two renames `final` is absent (never partial).
    """
    final = Path(final)
    for f in Path(tmp).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(_existing(folder)).free


def disk_full_error(folder: Path, needed: int, what: str = "this step", bound: str = "about") -> UserError:
    """The one line for a full disk: the folder, the space `what` needs (`bound`: about / up to), what is free."""
    existing = _existing(folder)
    free = f"{format_bytes(free_bytes(existing))} free there"
    if os.statvfs(existing).f_favail == 0:
        free += " and no free inode"
    return UserError(f"no space left on the device of {folder}: {what} needs {bound} {format_bytes(needed)}, "
                     f"{free}: free some space and rerun (or point NANOPIPE_BASE_DIR or NANOPIPE_REPORT_DIR at a "
                     "bigger disk)")


def _existing(folder: Path) -> Path:
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return folder


def is_disk_full(exc: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: an OSError saying so, a library's error quoting it, or (for
    libraries whose message does not say, e.g. torch.save's "unexpected pos") less free space than it needed,
    or no free inode left."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    library_error = isinstance(exc, (OSError, RuntimeError)) or "Safetensor" in type(exc).__name__
    return library_error and (free_bytes(folder) < needed or os.statvfs(_existing(folder)).f_favail == 0)


@contextlib.contextmanager
def disk_space(folder: Path, needed: int, what: str = "this step"):
    """Check before writing `needed` bytes into `folder`, and turn a full disk while writing into one line.

    The caller's own cleanup (temp files removed on error) runs first, so what was there before stays intact.
    """
    if free_bytes(folder) < needed:
        raise disk_full_error(folder, needed, what)
    try:
        yield
    except Exception as e:
        if is_disk_full(e, folder, needed):
            raise disk_full_error(folder, needed, what) from None
        raise


# ---------------------------------------------------------------------------------------------
# reading the user's text files: bytes that are not UTF-8 are a UserError naming the file and line

TO_UTF8 = "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"


def _not_utf8(path, line: int, raw: bytes, error: UnicodeDecodeError, fix: str) -> UserError:
    return UserError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x}): {fix}")


def read_text_file(path, fix: str = TO_UTF8) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data.count(b"\n", 0, e.start) + 1, data, e, fix) from None


def iter_text_lines(path, fix: str = TO_UTF8):
    """(line number, line) of a UTF-8 text file, streamed (for files too large to hold)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, line_number, raw, e, fix) from None


# ---------------------------------------------------------------------------------------------
# device and dtype

def autodetect_device(override: str | None = None) -> str:
    """cuda > mps > cpu, unless `--device` (override) or NANOPIPE_DEVICE says otherwise."""
    choice = override or os.environ.get("NANOPIPE_DEVICE")
    if choice:
        if choice not in ("cuda", "mps", "cpu"):
            raise UserError(f"unknown device {choice!r} (from --device or NANOPIPE_DEVICE): use cuda, mps or cpu")
        if choice == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda was asked for but torch sees no CUDA GPU: check `nvidia-smi` and that a "
                            "CUDA build of torch is installed")
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


# bf16 dense (no sparsity) tensor-core peak FLOP/s by product, from NVIDIA's datasheets and whitepapers (the
# sparse figures they headline are 2x these). Keys are device names as canonical_gpu_name() reduces them, so
# "NVIDIA H100 80GB HBM3" and "NVIDIA H100 SXM5 80GB" are both "h100" and "NVIDIA H100 NVL" is not.
PEAK_FLOPS = {
    "h100": 989e12, "h100 pcie": 756e12, "h100 nvl": 835e12,  # H100 SXM5 / PCIe / NVL datasheets
    "h200": 989e12, "h200 nvl": 835e12,  # H200 SXM / NVL datasheet
    "gh200": 989e12,  # the Grace Hopper superchip's H100 (SXM clocks)
    "a100": 312e12, "a100 pcie": 312e12,  # SXM4 and PCIe, 40 and 80 GB
    "l40s": 362e12, "l40": 181e12,
    "rtx 4090": 165.2e12, "rtx 5090": 209.5e12, "rtx 3090": 71e12,  # Ada/Blackwell/Ampere whitepapers, fp32 accum
    "b200": 2.25e15, "gb200": 2.5e15, "b100": 1.8e15,
    # GB10 (DGX Spark): NVIDIA publishes only "1 PFLOP FP4 with sparsity". 209e12 is the nanochat Spark fork's
    # "BF16 estimate", kept so MFU compares with its runs; a review on huggingface.js#2117 puts bf16 near 100e12.
    # NANOPIPE_PEAK_FLOPS=100e12 measures against the lower figure.
    "gb10": 209e12,
    "mi300x": 1.3074e15,
}
_NAME_NOISE = re.compile(r"\b(nvidia|geforce|amd|instinct|tesla|sxm\d?|\d+\s*gb?|hbm\d?e?)\b")


def canonical_gpu_name(name: str) -> str:
    """A device name without vendor, form-factor and memory words: "NVIDIA A100-SXM4-80GB" -> "a100"."""
    words = _NAME_NOISE.sub(" ", re.sub(r"[-_]", " ", name.lower()))
    return " ".join(words.split())


def peak_flops_of(name: str) -> float | None:
    """The bf16 peak of the GPU called `name` (as torch.cuda.get_device_name says it); None if not known."""
    return PEAK_FLOPS.get(canonical_gpu_name(name))


def peak_flops(device: str) -> float | None:
    """bf16 peak of the local GPU; None on CPU/MPS/unknown GPUs (MFU is then left blank, not faked).

    NANOPIPE_PEAK_FLOPS overrides, because published peaks (GB10 especially) are disputed.
    """
    if os.environ.get("NANOPIPE_PEAK_FLOPS"):
        return float(os.environ["NANOPIPE_PEAK_FLOPS"])
    if device != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name())


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


def autocast(device: str, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU and MPS compute in fp32)."""
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
